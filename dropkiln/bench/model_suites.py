"""The suites that run a diffusion model: train, generate, and generation through the daemon."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from dropkiln.bench.profile import Profiler
from dropkiln.bench.record import SuiteRecord
from dropkiln.bench.suites import BenchOptions


def train_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """Train stage steps/s against the minimal diffusers + peft loop, by micro-batch."""
    from dropkiln.bench.train import WARMUP_STEPS, bench_train
    from dropkiln.bench.train_daemon import STEPS, bench_train_daemon
    from dropkiln.bench.train_job import bench_train_job

    warmup = options.warmup if options.warmup is not None else WARMUP_STEPS
    config: dict[str, Any] = {
        "steps": options.pick(options.steps, 60, warmup + 20),
        "size": options.pick(options.resolution, 64, 64),
        "rank": 8,
        "n_images": 8,
        "model": options.model,
        "repeat": options.pick(options.repeats, 3, 2),
        "device": options.device,
        "warmup": warmup,
    }
    batches = options.sweep((1, 2, 4), (1, 2))
    record = SuiteRecord("train", config={**config, "batch_sizes": list(batches)})
    runs = []
    for number, batch in enumerate(batches):
        figures = bench_train(
            **config,
            batch_size=batch,
            models_dir=options.models_dir,
            profiler=profiler if number == 0 else None,
        )
        record.profile = record.profile or figures.pop("profile", None)
        runs.append(figures)
    head = runs[0]
    record.latencies("stage_step", head["stage_step_s"], f"one step, batch {batches[0]}")
    record.latencies(
        "loop_step", head["minimal_loop_step_s"], f"minimal loop step, batch {batches[0]}"
    )
    record.phases = {"stage": head["stage_phases"], "minimal_loop": head["minimal_loop_phases"]}
    record.series = {
        "stage_loss": [list(pair) for pair in head["stage_losses"]],
        "minimal_loop_loss": [list(pair) for pair in head["minimal_loop_losses"]],
    }
    rows = []
    for batch, figures in zip(batches, runs, strict=True):
        stage, loop = figures["stage_steps_per_s"], figures["minimal_loop_steps_per_s"]
        # Median step times resist bursts of other load; best-of runs rewards luck.
        median = statistics.median(figures.pop("minimal_loop_step_s")) / statistics.median(
            figures.pop("stage_step_s")
        )
        figures.pop("stage_losses")
        figures.pop("minimal_loop_losses")
        record.metric(f"steps_per_s[b={batch}]", stage, "steps/s", "higher", headline=True)
        record.metric(f"images_per_s[b={batch}]", round(stage * batch, 3), "images/s", "higher")
        record.metric(f"loop_steps_per_s[b={batch}]", loop, "steps/s", "higher")
        record.metric(f"ratio_best_runs[b={batch}]", figures["ratio"], "x", None, ">= 0.95")
        record.metric(f"ratio_median_step[b={batch}]", round(median, 3), "x", None, ">= 0.95")
        rows.append(
            {
                "batch_size": batch,
                "steps_per_s": stage,
                "minimal_loop_steps_per_s": loop,
                "images_per_s": round(stage * batch, 3),
                "ratio_best_runs": figures["ratio"],
                "ratio_median_step": round(median, 3),
            }
        )
    record.swept("batch_size", "images_per_s", rows)
    record.metric("in_process_ratio_median_step", rows[0]["ratio_median_step"], "x", None,
                  ">= 0.95")  # fmt: skip
    daemon = bench_train_daemon(
        steps=options.pick(options.steps, STEPS, 16), size=config["size"], rank=config["rank"],
        repeat=options.pick(options.repeats, 3, 1), model=options.model,
        models_dir=options.models_dir, threads=options.threads or 0,
    )  # fmt: skip
    record.latencies(
        "daemon_train_job", daemon["jobs_s"], "a dataset's jobs (bucket → train) in a daemon"
    )
    record.latencies("clean_train_job", daemon["clean_s"], "the same work, clean script")
    record.metric("daemon_ratio_best", daemon["ratio_best"], "x", None)
    record.compared(
        "a clean diffusers + peft training script in its own process (bench/clean.py)",
        daemon["ratio"],
        "median over runs of: seconds of a dataset's jobs in a `dropkiln daemon` (default "
        "settings), from the bucket job's start to the train job's end ÷ seconds of the clean "
        "script from reading the first image to its last save (the same encoding, steps and "
        f"saves), the two back to back; per run {daemon['ratio_spread'][0]}-"
        f"{daemon['ratio_spread'][1]}",
        "<= 1.10",
    )
    record.notes.append(
        f"daemon train job: settle_seconds {daemon['settle_seconds']}, torch threads "
        f"{daemon['torch_threads']}, {daemon['steps']} steps with a checkpoint every "
        f"{daemon['checkpoint_every']} (the default cadence); the steps/s sweep and "
        "whole_job_ratio run in one process (LocalContext) as a breakdown."
    )
    job = bench_train_job(
        steps=options.pick(options.steps, 40, 16),
        size=config["size"],
        rank=config["rank"],
        model=options.model,
        repeat=options.pick(options.repeats, 2, 1),
        models_dir=options.models_dir,
        device=options.device,
    )
    record.metric("whole_job_ratio", job["ratio"], "x", None, ">= 0.9")
    record.metric("step_lora_share_of_job", job["step_lora_share_of_job"], "x", "lower")
    record.metric("step_lora_bytes_total", job["step_lora_bytes_total"], "bytes", "lower")
    record.raw = {"runs": runs, "whole_job": job, "daemon": daemon}
    return record


def generate_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """The generate stage against bare diffusers calls; images per call swept on diffusers."""
    from dropkiln.bench.cache import link_models
    from dropkiln.bench.generate import bench_stage_overhead
    from dropkiln.bench.generate_batch import bench_batched

    config: dict[str, Any] = {
        "images": 8 if not options.quick else 4,
        "size": options.pick(options.resolution, 128, 64),
        "steps": options.pick(options.steps, 8, 4),
        "repeat": options.pick(options.repeats, 3, 2),
        "model": options.model,
        "device": options.device,
        "warmup": options.pick(options.warmup, 1, 1),
    }
    per_call = options.sweep((1, 2, 4), (1, 2))
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        link_models(root, options.models_dir)
        figures = bench_stage_overhead(root, **config, per_call=per_call, profiler=profiler)
        batched = bench_batched(
            root, config["images"], max(per_call), config["size"], config["steps"],
            config["repeat"], options.model, options.device,
        )  # fmt: skip
    record = SuiteRecord("generate", config={**config, "images_per_call": list(per_call)})
    record.profile = figures.pop("profile", None)
    stage_image_s, direct_image_s = figures.pop("stage_image_s"), figures.pop("direct_image_s")
    record.latencies("stage_image", stage_image_s, "one image through the stage")
    record.latencies("direct_image", direct_image_s, "one bare diffusers call")
    median = statistics.median(stage_image_s) / statistics.median(direct_image_s)
    record.metric("ratio_median_image", round(median, 3), "x", None, "<= 1.05")
    record.phases = {"stage": figures["stage_phases"], "direct": figures["direct_phases"]}
    images = config["images"]
    record.metric(
        "images_per_s", round(images / figures["stage_s"], 3), "images/s", "higher", headline=True
    )
    record.metric(
        "direct_images_per_s", round(images / figures["direct_s"], 3), "images/s", "higher"
    )
    record.metric(
        "ratio_vs_direct_with_png_save", figures["ratio_vs_direct_with_save"], "x", None, "<= 1.05"
    )
    record.metric("same_images", float(figures["same_images"]), "bool")
    rows = []
    for row in figures["per_call"]:
        count = row["images_per_call"]
        record.metric(
            f"direct_images_per_s[per_call={count}]", row["images_per_s"], "images/s", "higher"
        )
        rows.append({"images_per_call": count, "images_per_s": row["images_per_s"]})
    record.swept("images_per_call", "images_per_s", rows)
    record.compared(
        "bare diffusers pipeline calls on the same warm pipeline",
        figures["ratio_vs_direct"],
        "stage seconds ÷ direct seconds, same images",
        "<= 1.05",
    )
    batch = batched["batch"]
    record.metric(
        f"batched_images_per_s[batch={batch}]", batched["stage_batched_images_per_s"],
        "images/s", "higher",
    )  # fmt: skip
    record.metric(
        f"batched_ratio_vs_direct[batch={batch}]", batched["ratio_vs_direct_batched"], "x",
        "higher", ">= 0.97", headline=True,
    )  # fmt: skip
    record.metric(
        f"batched_speedup_vs_batch_1[batch={batch}]", batched["speedup_batched_vs_single"], "x",
        "higher", headline=True,
    )  # fmt: skip
    record.metric("batched_same_files", float(batched["same_files_as_direct_batched"]), "bool")
    for side, seconds in batched["outside_pipeline_median_s"].items():
        record.metric(f"batched_outside_pipeline_s[{side}]", seconds, "s", "lower")
    record.notes.append(
        "The overhead run renders one image per call; the batched run sets batch_size to the "
        "largest images-per-call and compares the whole stage run (records, fsynced PNGs, "
        "contact sheet) with bare diffusers calls of that many prompts whose images are saved "
        "as PNGs with the same infotext, as a script would (stage images/s ÷ direct "
        "images/s), and with the stage at batch 1."
    )
    figures["batched"] = batched
    record.raw = figures
    return record


def _outside(record: SuiteRecord, ms: dict[str, float], prefix: str, suffix: str = "") -> None:
    """Milliseconds per drop outside diffusers' calls, the daemon's and each clean process's."""
    for side, value in ms.items():
        record.metric(f"{prefix}outside_pipeline_ms_{side}{suffix}", value, "ms", "lower")
    drops = "batched drops" if prefix else "single-image drops"
    record.notes.append(
        f"{drops}, median ms outside diffusers' pipeline calls (the daemon: JobStarted → last "
        f"PNG less its calls): {ms}"
    )


def _same_threads(
    record: SuiteRecord, alike: dict[str, Any] | None, threads: int, prefix: str,
    suffix: str = "",
) -> None:  # fmt: skip
    """The daemon against a clean process at its own thread count, when that is not torch's
    default: what the daemon costs apart from its thread policy."""
    if alike is None:
        return
    record.latencies(f"{prefix}clean_same_threads{suffix}", alike["clean_s"],
                     f"clean process at the daemon's {threads} torch threads")  # fmt: skip
    record.metric(f"{prefix}ratio_same_threads{suffix}", alike["ratio"], "x", "lower")
    record.metric(f"{prefix}default_threads_speedup{suffix}", alike["default_threads_speedup"],
                  "x", None)  # fmt: skip
    low, high = alike["ratio_spread"]
    record.notes.append(
        f"{'batched' if prefix else 'single-image'} drops against a clean process at the "
        f"daemon's {threads} torch threads: {alike['ratio']} (per turn {low}-{high}, the "
        f"median's 95% interval "
        f"{alike['ratio_ci95'][0]}-{alike['ratio_ci95'][1]}); the clean process at torch's "
        f"default count ran {alike['default_threads_speedup']}x as fast as that one"
    )


def daemon_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """Prompt files through a `dropkiln daemon` process (default settings) against a clean
    diffusers process, and a row of files against a process per file."""
    from dropkiln.bench.daemon import bench_daemon

    config: dict[str, Any] = {
        "images": 4 if not options.quick else 2,
        "size": options.pick(options.resolution, 96, 64),
        "steps": options.pick(options.steps, 12, 4),
        "repeat": options.pick(options.repeats, 21, 2),
        "files": 10 if not options.quick else 2,
        "file_images": 1,
        "model": options.model,
        "device": options.device,
        "warmup": options.pick(options.warmup, 1, 1),
        "threads": options.threads or 0,
    }
    # --profile: py-spy samples the daemon's process (torch.profiler cannot reach into it)
    figures = bench_daemon(**config, models_dir=options.models_dir, profile=profiler is not None)
    warm, row = figures["warm"], figures["row"]
    config["settle_seconds"] = figures["settle_seconds"]
    config["torch_threads"] = figures["torch_threads"]
    record = SuiteRecord("daemon", config=config)
    record.latencies("run", warm.pop("run_s"), "JobStarted → last PNG, daemon process")
    record.latencies("clean", warm.pop("clean_s"), "same images, clean diffusers process")
    record.latencies("pickup", warm.pop("pickup_s"), "prompt file dropped → job started")
    record.metric("ratio_best", warm["ratio_best"], "x", None)
    record.metric("same_images", float(warm["same_images"]), "bool")
    record.metric("row_daemon_s", row["daemon_s"], "s", "lower", headline=True)
    record.latencies("row_file", row.pop("daemon_file_s"), "row: drop → that file's last PNG")
    processes = row.get("processes_s")
    if processes is not None:
        record.latencies("process_file", row.pop("process_file_s"), "one process per file")
        record.metric("row_processes_s", processes, "s", "lower")
        record.metric(
            "row_speedup_vs_processes",
            round(processes / row["daemon_s"], 2),
            "x",
            "higher",
            headline=True,
        )
    record.metric("drop_files_per_s", round(row["files"] / row["daemon_s"], 3), "files/s", "higher")
    record.compared(
        "a clean diffusers process (warm model, its own process, turns interleaved)",
        warm["ratio"],
        "median over turns of: JobStarted → last PNG ÷ the clean seconds for the same images, "
        f"the two back to back (per turn {warm['ratio_spread'][0]}-{warm['ratio_spread'][1]}, "
        f"the median's 95% interval {warm['ratio_ci95'][0]}-{warm['ratio_ci95'][1]})",
        "<= 1.05",
    )
    _outside(record, warm.pop("outside_pipeline_ms"), "")
    _same_threads(record, warm.pop("same_threads"), figures["torch_threads"]["daemon"], "")
    batched = warm["batched"]
    if batched:
        size = batched["batch"]
        _outside(record, batched.pop("outside_pipeline_ms"), "batched_", f"[batch={size}]")
        _same_threads(record, batched.pop("same_threads"), figures["torch_threads"]["daemon"],
                      "batched_", f"[batch={size}]")  # fmt: skip
        record.latencies(f"batched_run[batch={size}]", batched["run_s"], "batched prompt file")
        record.latencies(f"batched_clean[batch={size}]", batched["clean_s"], "clean, batched")
        record.latencies(f"batched_done[batch={size}]", batched["done_s"], "to JobSucceeded")
        record.metric(f"batched_images_per_s_ratio[batch={size}]",
                      batched["images_per_s_ratio"], "x", "higher", ">= 0.97",
                      headline=True)  # fmt: skip
        low, high = batched["images_per_s_ratio_spread"]
        record.notes.append(
            f"batched images/s ratio (batch {size}): the median of {len(batched['run_s'])} "
            f"turns' ratios, the daemon and the clean process back to back; per turn {low}-{high}"
            f", the median's 95% interval {batched['images_per_s_ratio_ci95'][0]}-"
            f"{batched['images_per_s_ratio_ci95'][1]}"
        )
        record.metric(f"batched_ratio[batch={size}]", batched["ratio"], "x", "lower", "<= 1.031")
        record.metric(f"batched_ratio_to_job_succeeded[batch={size}]", batched["ratio_done"],
                      "x", "lower")  # fmt: skip
        record.metric(f"batched_speedup_vs_batch_1[batch={size}]",
                      warm["speedup_batched_vs_single"], "x", "higher")  # fmt: skip
        record.metric("batched_same_files", float(batched["same_images"]), "bool")
    settle = figures["settle_seconds"]
    beyond_settle_ms = round((warm["pickup_p95_s"] - settle) * 1000, 1)
    record.metric("pickup_p95_beyond_settle_ms", beyond_settle_ms, "ms", "lower", "<= 50", True)
    record.notes.append(
        f"settle_seconds is {settle} (the daemon's default unless --settle); pickup p95 "
        f"{warm['pickup_p95_s']:.3f} s (goal <= {settle + 0.05:.2f} s) is reported apart."
    )
    record.notes.append(
        f"torch threads {figures['torch_threads']}; load average before "
        f"{figures['load_average_before']}, after {figures['load_average_after']}"
    )
    # py-spy's parts, not a torch.profiler table (``record.profile``): notes, and in raw
    for drops, parts in figures["profile"].items():
        for thread in ("device_thread", "png_writer_thread", "records_thread"):
            spent = ", ".join(f"{part} {ms:g}" for part, ms in parts.get(thread, {}).items())
            record.notes.append(f"--profile, {drops} drops, {thread}, ms per drop: {spent}")
    record.raw = figures
    return record
