"""The suites of ``dropkiln bench``: the options they share, and the store, bucket, cache and
video suites (train, generate and daemon are in model_suites.py).

Each suite runs the module's ``bench_*`` function and turns its figures into a SuiteRecord.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropkiln.bench.profile import Profiler
from dropkiln.bench.record import SuiteRecord


@dataclass(frozen=True)
class BenchOptions:
    """What the command line asked for; None means the suite's own default."""

    model: str
    device: str
    models_dir: Path
    quick: bool = False
    resolution: int | None = None
    steps: int | None = None
    batch_sizes: tuple[int, ...] | None = None
    repeats: int | None = None
    warmup: int | None = None
    events: int | None = None
    threads: int | None = None
    """--threads: the in-process suites' torch threads; the daemon suite's daemon and clean
    process get it too, else their defaults."""

    def pick(self, given: int | None, full: int, quick: int) -> int:
        if given is not None:
            return given
        return quick if self.quick else full

    def sweep(self, full: tuple[int, ...], quick: tuple[int, ...]) -> tuple[int, ...]:
        if self.batch_sizes is not None:
            return self.batch_sizes
        return quick if self.quick else full


def store_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """Event appends, cross-process tail latency and status time against plain sqlite3."""
    from dropkiln.bench.store import bench_store

    config: dict[str, Any] = {
        "single": 3000 if not options.quick else 300,
        "batches": 100 if not options.quick else 10,
        "batch_size": 100,
        "tail_samples": 200 if not options.quick else 40,
        "status_events": options.pick(options.events, 1_000_000, 20_000),
    }
    figures = bench_store(**config)
    record = SuiteRecord("store", config=config)
    record.latencies("commit", figures.pop("single_commit_s"), "one single-event append")
    record.latencies("tail", figures.pop("tail_latency_s"), "commit in another process → tail")
    record.latencies("status", figures.pop("status_run_s"), "status queries, store opened")
    record.metric(
        "single_commits_per_s",
        figures["single_commits_per_s"],
        "commits/s",
        "higher",
        ">= 2000",
        headline=True,
    )
    record.metric(
        "projected_commits_per_s", figures["projected_commits_per_s"], "commits/s", "higher"
    )
    record.metric(
        "batched_events_per_s", figures["batched_events_per_s"], "events/s", "higher", headline=True
    )
    record.metric(
        "plain_sqlite_commits_per_s", figures["sqlite_commits_per_s"], "commits/s", "higher"
    )
    record.flag("tail_p95_ms", "< 100")
    record.metric("status_s", figures["status_s"], "s", "lower", "< 0.2", headline=True)
    record.metric("status_all_jobs_s", figures["status_all_jobs_s"], "s", "lower")
    record.metric("big_store_events", figures["big_store_events"], "events")
    record.compared(
        "plain sqlite3 single-row commits (same pragmas)",
        figures["single_vs_sqlite"],
        "dropkiln commits/s ÷ sqlite3 commits/s",
    )
    record.raw = figures
    _no_profile(record, profiler)
    return record


def bucket_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """Bucketing throughput with one decode worker and with all cores."""
    from dropkiln.bench.bucket import bench_bucket

    images = 200 if not options.quick else 48
    size = (2048, 1536) if not options.quick else (1024, 768)
    resolution = options.pick(options.resolution, 1024, 256)
    workers = sorted({1, os.cpu_count() or 1})
    repeat = options.pick(options.repeats, 2, 1)
    figures = bench_bucket(
        n_images=images, size=size, workers=workers, repeat=repeat, resolution=resolution
    )
    record = SuiteRecord(
        "bucket",
        config={"images": images, "size": list(size), "resolution": resolution, "repeat": repeat},
    )
    rows = []
    for run in figures["runs"]:
        count = run["workers"]
        record.latencies(f"run_{count}_workers", run["seconds_all"], f"{images} images")
        record.metric(
            f"images_per_s[workers={count}]",
            run["images_per_s"],
            "images/s",
            "higher",
            headline=True,
        )
        rows.append({"workers": count, "images_per_s": run["images_per_s"]})
    record.swept("workers", "images_per_s", rows)
    record.compared(
        "single-process bucketing (one worker)",
        figures["speedup"],
        "all cores ÷ one worker, images/s",
        ">= 1.7 on 2 cores",
    )
    record.metric("identical_manifests", float(figures["same_manifest"]), "bool")
    record.raw = figures
    _no_profile(record, profiler)
    return record


def cache_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """Cache throughput by VAE batch, and one changed image against caching from scratch."""
    from dropkiln.bench.cache import bench_cache

    batches = options.sweep((1, 4, 8), (2, 8))
    config: dict[str, Any] = {
        "n_images": 200 if not options.quick else 16,
        "size": options.pick(options.resolution, 64, 64),
        "model": options.model,
        "repeat": options.pick(options.repeats, 2, 1),
        "vae_batch_size": max(batches),
        "device": options.device,
    }
    figures = bench_cache(
        **config, models_dir=options.models_dir, vae_batch_sizes=batches, profiler=profiler
    )
    record = SuiteRecord("cache", config={**config, "vae_batch_sizes": list(batches)})
    record.profile = figures.pop("profile", None)
    record.latencies("vae_batch", figures.pop("vae_batch_s"), "one VAE batch, from scratch")
    record.latencies("from_scratch", figures["from_scratch_all"], "whole dataset")
    record.latencies("one_changed", figures["one_changed_all"], "whole dataset, one changed")
    record.metric("images_per_s", figures["images_per_s"], "images/s", "higher", headline=True)
    record.metric("from_scratch_s", figures["from_scratch_s"], "s", "lower")
    record.metric("one_changed_s", figures["one_changed_s"], "s", "lower")
    record.metric("warm_up_s", figures["warm_up_s"], "s", "lower")
    rows = []
    for row in figures.pop("sweep"):
        batch = row["vae_batch_size"]
        record.metric(f"images_per_s[vae_batch={batch}]", row["images_per_s"], "images/s", "higher")
        rows.append({"vae_batch_size": batch, "images_per_s": row["images_per_s"]})
    record.swept("vae_batch_size", "images_per_s", rows)
    record.compared(
        "caching the dataset from scratch",
        figures["one_changed_ratio"],
        "one image changed ÷ from scratch, seconds",
        "< 0.05",
    )
    record.raw = figures
    return record


def video_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """A slideshow through the stage against the same frames piped to ffmpeg in memory."""
    from dropkiln.bench.video import bench_video

    config: dict[str, Any] = {
        "images": 8 if not options.quick else 3,
        "size": options.pick(options.resolution, 512, 128),
        "repeat": options.pick(options.repeats, 2, 1),
    }
    figures = bench_video(**config)
    record = SuiteRecord("video", config=config)
    record.latencies("stage", figures["stage_all"], "whole slideshow through the stage")
    record.latencies("in_memory", figures["in_memory_all"], "same frames piped to ffmpeg")
    record.metric(
        "frames_per_s", figures["stage_frames_per_s"], "frames/s", "higher", headline=True
    )
    record.metric("stage_s", figures["stage_s"], "s", "lower")
    record.metric("in_memory_s", figures["in_memory_s"], "s", "lower")
    record.compared(
        "in-memory encode of the same frames", figures["ratio"], "stage seconds ÷ in-memory seconds"
    )
    record.raw = figures
    _no_profile(record, profiler)
    return record


def api_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """`dropkiln serve`: GET /v1/jobs on 10,000 jobs; event → SSE client vs `events --follow`."""
    import tempfile

    from dropkiln.bench.api import bench_api, summary

    config: dict[str, Any] = {
        "jobs": options.pick(options.events, 10_000, 1_000),
        "requests": options.pick(options.repeats, 300, 60),
        "events": 200 if not options.quick else 40,
    }
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-api-") as folder:
        figures = bench_api(Path(folder) / "home", **config)
    ms = summary(figures)
    record = SuiteRecord("api", config=config)
    record.latencies("list_jobs", figures["list_jobs_s"], "GET /v1/jobs (newest 50), keep-alive")
    record.latencies("query", figures["query_s"], "the same read in-process, no HTTP")
    record.latencies("sse", figures["sse_latency_s"], "commit in another process → SSE client")
    record.latencies("cli_follow", figures["cli_latency_s"], "the same → `events --follow`")
    record.flag("list_jobs_p50_ms")
    record.flag("list_jobs_p99_ms")
    record.flag("sse_p95_ms")
    record.flag("cli_follow_p95_ms")
    record.metric(
        "sse_minus_cli_p95_ms", ms["sse_minus_cli_p95_ms"], "ms", "lower", "<= 50", headline=True
    )
    record.metric("store_events", figures["store_events"], "events")
    record.compared(
        "the same status read in-process",
        ms["list_jobs_p50_ms"] / ms["query_p50_ms"] if ms["query_p50_ms"] else float("nan"),
        "GET /v1/jobs p50 ÷ in-process read p50",
    )
    _no_profile(record, profiler)
    return record


def idle_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """A real daemon with nothing to do: its CPU share, then how soon it still takes a drop."""
    from dropkiln.bench.idle import bench_idle

    config: dict[str, Any] = {
        "seconds": 60.0 if not options.quick else 15.0,
        "drops": options.pick(options.repeats, 10, 3),
        "jobs": options.pick(options.repeats, 10, 3),
    }
    figures = bench_idle(**config)
    record = SuiteRecord("idle", config=config)
    record.latencies(
        "reaction", figures.pop("reaction_s"), "drop's last write → DropRejected, less settle"
    )
    record.latencies(
        "job_reaction",
        figures.pop("job_reaction_s"),
        "another process's JobSubmitted → the daemon's JobFailed (its dependency had failed)",
    )
    record.metric(
        "idle_core_percent",
        figures["idle_core_percent"],
        "% of a core",
        "lower",
        "<= 0.5",
        headline=True,
    )
    record.metric(
        "reaction_p95_s", figures["reaction_p95_s"], "s", "lower", "<= 0.05", headline=True
    )
    record.metric(
        "job_reaction_p95_s", figures["job_reaction_p95_s"], "s", "lower", "< 0.1", headline=True
    )
    record.metric("settle_seconds", figures["settle_seconds"], "s")
    record.metric("window_s", figures["window_s"], "s")
    record.notes.append(
        f"CPU over a {figures['window_s']} s window after a {figures['warmup_s']:g} s warm-up; "
        "by thread: "
        + ", ".join(f"{t['thread']}: {t['ticks']} ticks" for t in figures["threads"])
        + f" ({figures['clock_ticks_per_s']} ticks a second)"
    )
    record.notes.append(
        f"load average before {figures['load_average_before']}, "
        f"after {figures['load_average_after']} (other work on the machine inflates both)"
    )
    record.raw = figures
    _no_profile(record, profiler)
    return record


def cli_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """`status`, `events` and `cancel` in fresh processes, against a bare interpreter."""
    from dropkiln.bench.cli_start import COMMANDS, bench_cli_start

    config: dict[str, Any] = {"runs": options.pick(options.repeats, 7, 3)}
    figures = bench_cli_start(**config)
    record = SuiteRecord("cli", config=config)
    record.latencies("python", figures["all_s"]["python"], "`python -c pass`, fresh process")
    for name in COMMANDS:
        what = f"`dropkiln {name}`, fresh process, spawn to exit"
        record.latencies(name, figures["all_s"][name], what)
        record.metric(f"{name}_s", figures[f"{name}_s"], "s", "lower", "<= 0.25", headline=True)
    record.notes.append(f"each *_s is the best of {config['runs']} runs")
    record.notes.append(
        "after one untimed run of each, with the bytecode cache written and read "
        "(PYTHONDONTWRITEBYTECODE cleared for the commands, as a user's shell has it)"
    )
    record.compared(
        "a bare interpreter (`python -c pass`, same turns)",
        max(figures[f"{name}_s"] for name in COMMANDS) / figures["python_s"],
        "slowest quick command ÷ bare interpreter start, best of each",
    )
    record.notes.append(
        f"load average before {figures['load_average_before']}, "
        f"after {figures['load_average_after']} (other work on the machine inflates both)"
    )
    record.raw = figures
    _no_profile(record, profiler)
    return record


def _no_profile(record: SuiteRecord, profiler: Profiler | None) -> None:
    if profiler is not None:
        record.notes.append(f"--profile: the {record.suite} suite runs no torch operators")
