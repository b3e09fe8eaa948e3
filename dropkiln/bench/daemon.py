"""Generation through the path users run: a `dropkiln daemon` process with default settings.

Prompt files are dropped into a real daemon subprocess (default settle time and torch
threads unless told otherwise). The baseline is plain diffusers in a fresh process of its
own (``bench/clean.py``), kept warm like the daemon's model; the two take turns, so
neither runs while the other is measured. Per drop:

- pickup: the drop's rename → ``JobStarted`` (watcher, ``settle_seconds``, ingest, plan);
- run: ``JobStarted`` → the last PNG, against the clean process's request → last PNG;
- a row of prompt files dropped at once into a freshly started daemon (model cold, loaded
  once) against one process per file that imports torch, loads the model and renders it;
- batched prompt files (``batch_size``) against a clean process of their own that makes the
  same files a user's script would: one diffusers call per batch (a generator per image),
  each image saved as a PNG with the same A1111 ``parameters`` text the daemon writes.
  The daemon side is timed to its last PNG and to ``JobSucceeded`` (its contact sheet and
  records included), the clean side to its last PNG saved.

The goal ratios are against a clean process at torch's default thread count; a second one at
the daemon's own count takes the same turns when that differs (``daemon_figures.py``).

With ``--profile``, py-spy samples the daemon through the warm drops and the figures say
where its device thread's time went, part by part (``generate_profile.py``).

Run ``python -m dropkiln.bench.daemon [--images N] [--size PX] [--steps N] [--files N]
[--threads N] [--profile]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from dropkiln.bench.cache import link_models
from dropkiln.bench.clean import CleanBatched, CleanDiffusers
from dropkiln.bench.daemon_figures import clean_turn, pipeline_ms, print_figures, same_threads
from dropkiln.bench.daemon_process import start_daemon, stop_daemon
from dropkiln.bench.generate import script_per_job, write_prompt_files
from dropkiln.bench.generate_profile import generation_parts, start_spy
from dropkiln.bench.same_images import same_file, same_pixels
from dropkiln.bench.stats import paired_ratio, percentile
from dropkiln.bench.train_profile import stop_spy
from dropkiln.config import Settings
from dropkiln.daemon.device_thread import cpu_threads
from dropkiln.store.vocabulary import DropState, JobState

POLL_S = 0.2
"""How often to ask whether the jobs are done: the times come from the PNGs' mtimes and the
jobs' start events, so a slow poll loses no precision and takes no CPU from the daemon."""
GUIDANCE = 5.0


def bench_daemon(
    images: int = 4, size: int = 96, steps: int = 12, repeat: int = 21, files: int = 10,
    file_images: int = 1, model: str = "tiny-sdxl", models_dir: Path | None = None,
    settle_seconds: float | None = None, device: str = "cpu", processes: bool = True,
    warmup: int = 1, threads: int = 0, batch: int = 4, profile: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Warm drops against the clean process, and a row of files against a process per file.

    ``settle_seconds`` and ``threads`` left at None/0 are the daemon's defaults; with
    ``profile``, py-spy samples the daemon through the warm drops (single and batched apart)."""
    from dropkiln.stages.models import resolve_model

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        link_models(root, models_dir)
        overrides: dict[str, Any] = {"model": model, "device": device, "torch_threads": threads}
        if settle_seconds is not None:
            overrides["settle_seconds"] = settle_seconds
        settings = Settings.load(root=root, **overrides)
        settings.paths.create()
        folder = resolve_model(model, settings.paths.models).path  # builds a tiny model
        run = _DaemonRun(settings, images, size, steps, overrides, profile)
        clean = CleanDiffusers(folder, threads)
        daemon_threads = cpu_threads(threads) or clean.threads
        alike = [] if daemon_threads == clean.threads else [CleanDiffusers(folder, daemon_threads)]
        clean_batched = [CleanBatched(folder, threads)] if batch > 1 else []
        if clean_batched and alike:
            clean_batched.append(CleanBatched(folder, daemon_threads))
        try:
            warm = run.warm([clean, *alike], warmup, repeat, batch, clean_batched)
        finally:
            for process in [clean, *alike, *clean_batched]:
                process.close()
        row = run.row(files, file_images)
        if processes:  # the script-per-job way: a process per file, each loading the model
            sets = [run.prompt_sets[f"row{number:02d}"] for number in range(files)]
            seconds = script_per_job(folder, root / "scripts", sets, steps, size, clean.threads)
            row.update({"processes_s": round(sum(seconds), 3), "process_file_s": seconds})
    return {
        "model": model,
        "device": device,
        "images_per_file": images,
        "size": size,
        "steps": steps,
        "settle_seconds": settings.settle_seconds,
        # the count the daemon's device thread runs (OMP_NUM_THREADS set: torch's, as the
        # clean process's)
        "torch_threads": {"daemon": daemon_threads, "clean": clean.threads},
        "warmup": warmup,
        "warm": warm,
        "row": row,
        "profile": run.profile_parts,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


class _DaemonRun:
    def __init__(
        self, settings: Settings, images: int, size: int, steps: int, overrides: dict[str, Any],
        profile: bool = False,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.profile = profile
        self.profile_parts: dict[str, Any] = {}
        self.images, self.size, self.steps = images, size, steps
        self.staging = settings.root / "staging"
        self.prompt_sets: dict[str, list[str]] = {}
        self._last_batched: dict[str, Any] = {}
        """The latest batched job: what a clean turn that goes first takes its infotext from."""
        self.environment = {
            **os.environ,
            **{f"DROPKILN_{key.upper()}": str(value) for key, value in overrides.items()},
        }

    def warm(
        self, cleans: list[CleanDiffusers], warmup: int, repeat: int, batch: int,
        clean_batched: list[CleanBatched],
    ) -> dict[str, Any]:  # fmt: skip
        """``cleans``: the clean process at torch's default threads, then (when it differs)
        one at the daemon's count; ``clean_batched`` the same, batched (empty: no batches)."""
        daemon = self._start()
        try:
            for number in range(warmup):
                # a first drop loads the model; its time belongs to neither side
                self._drop_and_wait([f"warm-up{number}"], [[f"warm-up {number}"]])
                for clean in cleans:
                    clean.render(self._request([f"warm-up {number}"]), self._clean_out("warm-up"))
            pickup: list[float] = []
            run: list[float] = []
            jobs: list[dict[str, Any]] = []
            baselines: list[list[float]] = [[] for _ in cleans]
            same = True
            spy = self._spy(daemon, "single")
            for attempt in range(repeat):
                prompts = [f"a lighthouse, drop {attempt} image {n}" for n in range(self.images)]
                outs = [self._clean_out(f"{attempt}-{arm}") for arm in range(len(cleans))]
                if attempt % 2:  # the sides swap who goes first (_batched says why)
                    clean_turn(cleans, baselines, outs, self._request(prompts))
                (job,) = self._drop_and_wait([f"warm{attempt:02d}"], [prompts])
                pickup.append(job["pickup_s"])
                run.append(job["run_s"])
                jobs.append(job)
                if not attempt % 2:
                    clean_turn(cleans, baselines, outs, self._request(prompts))
                same = same and same_pixels(Path(job["images"][0]), outs[-1] / "000.png")
            self._unspy(spy, "single", repeat)
            batched = {}
            if clean_batched:
                batched = self._batched(daemon, clean_batched, warmup, repeat, batch)
        finally:
            stop_daemon(daemon)
        baseline = baselines[0]
        paired = paired_ratio(run, baseline)
        return {
            "repeat": repeat,
            "pickup_s": pickup,
            "run_s": run,
            "clean_s": baseline,
            "run_median_s": round(statistics.median(run), 4),
            "clean_median_s": round(statistics.median(baseline), 4),
            "ratio": paired["ratio"],
            "ratio_spread": [paired["min"], paired["max"]],
            "ratio_ci95": paired["ci95"],
            "ratio_per_turn": paired["per_turn"],
            "ratio_of_medians": round(statistics.median(run) / statistics.median(baseline), 3),
            "ratio_best": round(min(run) / min(baseline), 3),
            "pickup_p95_s": round(percentile(pickup, 95), 4),
            "same_images": same,
            "same_threads": same_threads(run, baselines),
            **pipeline_ms(jobs, cleans, repeat),
            "batched": batched,
            "speedup_batched_vs_single": (
                round(statistics.median(run) / statistics.median(batched["run_s"]), 3)
                if batched
                else None
            ),
        }

    def _batched(
        self, daemon: subprocess.Popen[bytes], cleans: list[CleanBatched], warmup: int,
        repeat: int, batch: int,
    ) -> dict[str, Any]:  # fmt: skip
        """Prompt files with ``batch_size = batch`` against the clean processes' batched calls
        saving the same files (pixels and ``parameters`` text compared with the last one's,
        the one at the daemon's thread count)."""
        for number in range(warmup):  # the first call at this batch size, on both sides
            prompts = [f"batch warm-up {number} image {n}" for n in range(self.images)]
            (job,) = self._drop_and_wait([f"batch-warm-up{number}"], [prompts], batch)
            for arm, clean in enumerate(cleans):
                out = self._clean_out(f"batch-warm-up{number}-{arm}")
                clean.render(self._batch_request(job, prompts), out, batch)
        run: list[float] = []
        jobs: list[dict[str, Any]] = []
        baselines: list[list[float]] = [[] for _ in cleans]
        same = True
        spy = self._spy(daemon, "batched")
        for attempt in range(repeat):
            prompts = [f"a harbour, batch {attempt} image {n}" for n in range(self.images)]
            outs = [self._clean_out(f"batch{attempt}-{arm}") for arm in range(len(cleans))]

            # The sides swap who goes first each turn, so a neighbour's load that follows
            # the bench's rhythm does not always fall on the same side. The clean process
            # needs the daemon's infotext: going first, it takes the one this turn's daemon
            # job will write (the same settings and seeds; only the prompts differ).
            if attempt % 2:
                request = self._batch_request(self._last_batched, prompts)
                clean_turn(cleans, baselines, outs, request, batch)
            (job,) = self._drop_and_wait([f"batch{attempt:02d}"], [prompts], batch)
            self._last_batched = job
            run.append(job["run_s"])
            jobs.append(job)
            if not attempt % 2:
                clean_turn(cleans, baselines, outs, self._batch_request(job, prompts), batch)
            pairs = zip(sorted(job["images"]), sorted(outs[-1].glob("*.png")), strict=True)
            same = same and all(same_file(Path(mine), theirs) for mine, theirs in pairs)
        self._unspy(spy, "batched", repeat)
        baseline, done_s = baselines[0], [job["done_s"] for job in jobs]
        paired = paired_ratio(run, baseline)
        return {
            "batch": batch,
            "run_s": run,
            "done_s": done_s,
            "clean_s": baseline,
            "ratio": paired["ratio"],
            "ratio_spread": [paired["min"], paired["max"]],
            "ratio_ci95": paired["ci95"],
            "ratio_per_turn": paired["per_turn"],
            "ratio_of_medians": round(statistics.median(run) / statistics.median(baseline), 3),
            "ratio_done": paired_ratio(done_s, baseline)["ratio"],
            "ratio_best": round(min(run) / min(baseline), 3),
            "images_per_s": round(self.images / statistics.median(run), 3),
            "clean_images_per_s": round(self.images / statistics.median(baseline), 3),
            "images_per_s_ratio": round(1 / paired["ratio"], 3),
            "images_per_s_ratio_spread": [round(1 / paired["max"], 3), round(1 / paired["min"], 3)],
            "images_per_s_ratio_ci95": [round(1 / bound, 3) for bound in paired["ci95"][::-1]],
            "same_images": same,
            "same_threads": same_threads(run, baselines),
            **pipeline_ms(jobs, cleans, repeat),
        }

    def _spy(self, daemon: subprocess.Popen[bytes], name: str) -> subprocess.Popen[bytes] | None:
        return start_spy(daemon.pid, self._raw(name)) if self.profile else None

    def _unspy(self, spy: subprocess.Popen[bytes] | None, name: str, turns: int) -> None:
        if not self.profile:
            return
        stop_spy(spy)
        if spy is None:
            self.profile_parts[name] = {"note": "py-spy is not installed (pip install py-spy)"}
        else:
            self.profile_parts[name] = generation_parts(self._raw(name), turns)

    def _raw(self, name: str) -> Path:
        return self.settings.root / f"profile-{name}.raw"

    def _batch_request(self, job: dict[str, Any], prompts: list[str]) -> list[dict[str, Any]]:
        """The daemon job's images as the clean process makes them: prompt, seed, stem, and
        the infotext the daemon wrote (a script builds the same string). ``job`` may be an
        earlier turn's: its infotext then gets this turn's prompt (A1111's text opens with
        it), and the files compared after the turn show whether that made the same text."""
        from dropkiln.stages.generation.png_files import PARAMETERS_KEY, read_png_text

        request = []
        written = zip(job["images"], job["prompts"], prompts, strict=True)
        for number, (path, its_prompt, prompt) in enumerate(written):
            text = read_png_text(Path(path))[PARAMETERS_KEY]
            text = prompt + text.removeprefix(its_prompt)
            request.append(
                {"prompt": prompt, "seed": 1 + number, "steps": self.steps,
                 "guidance": GUIDANCE, "width": self.size, "height": self.size,
                 "stem": Path(path).stem, "parameters": text}
            )  # fmt: skip
        return request

    def row(self, files: int, file_images: int) -> dict[str, Any]:
        daemon = self._start()  # a fresh daemon: the row pays for one model load
        try:
            stems = [f"row{number:02d}" for number in range(files)]
            sets = [[f"file {f} image {n}" for n in range(file_images)] for f in range(files)]
            jobs = self._drop_and_wait(stems, sets)
        finally:
            stop_daemon(daemon)
        return {
            "files": files,
            "images_per_file": file_images,
            "daemon_s": round(max(job["latency_s"] for job in jobs), 3),
            "daemon_file_s": [job["latency_s"] for job in jobs],
        }

    def _start(self) -> subprocess.Popen[bytes]:
        return start_daemon(self.settings, self.environment)

    def _request(self, prompts: list[str]) -> list[dict[str, Any]]:
        return [
            {"prompt": prompt, "seed": 1 + number, "steps": self.steps, "guidance": GUIDANCE,
             "width": self.size, "height": self.size}
            for number, prompt in enumerate(prompts)
        ]  # fmt: skip

    def _clean_out(self, name: str) -> Path:
        return self.settings.root / "clean" / name

    def _drop_and_wait(
        self, stems: list[str], prompt_sets: list[list[str]], batch: int | None = None
    ) -> list[dict[str, Any]]:
        """Drop the files together; per file: drop → job start → its last PNG."""
        built = write_prompt_files(
            self.staging, prompt_sets, self.steps, self.size, prefix="", batch=batch
        )
        dropped_at = time.time()
        for stem, path, prompts in zip(stems, built, prompt_sets, strict=True):
            self.prompt_sets[stem] = prompts
            path.rename(self.settings.paths.prompts / f"{stem}.toml")
        while True:
            time.sleep(POLL_S)
            mine = anyio.run(self._jobs, stems)
            if all(job is not None and job.terminal for job in mine):
                break
        results = []
        for stem, job in zip(stems, mine, strict=True):
            if job.state != JobState.SUCCEEDED or job.result is None or job.started_at is None:
                raise RuntimeError(f"generate job {job.name} ended {job.state}: {job.error}")
            result = job.result
            last_png = max(Path(p).stat().st_mtime for p in result["images"])
            started = datetime.fromisoformat(job.started_at).timestamp()
            finished = datetime.fromisoformat(job.finished_at or job.started_at).timestamp()
            results.append(
                {
                    "images": result["images"],
                    "prompts": self.prompt_sets[stem],
                    "pickup_s": started - dropped_at,
                    "run_s": last_png - started,
                    # JobStarted → last PNG less the time in diffusers' calls: dropkiln's own
                    "outside_s": last_png - started - result["pipeline_seconds"],
                    "inside_s": (result["pipeline_seconds"], result["pipeline_cpu_seconds"]),
                    "done_s": finished - started,
                    "latency_s": last_png - dropped_at,
                }
            )
        return results

    async def _jobs(self, stems: list[str]) -> list[Any]:
        from dropkiln.store import EventStore, list_drops, list_jobs

        store = await EventStore.open(self.settings.paths.db)
        try:
            failed = [d for d in await list_drops(store) if d["state"] == DropState.FAILED]
            if failed:
                raise RuntimeError(f"drop {failed[0]['name']} rejected: {failed[0]['reason']}")
            jobs = {j.name: j for j in await list_jobs(store) if j.stage == "generate"}
        finally:
            await store.close()
        return [jobs.get(stem) for stem in stems]


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.daemon")
    parser.add_argument("--images", type=int, default=4, help="images per warm prompt file")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=12)
    # 21 turns: the median's 95% interval is the 6th to 16th of them, about +-3% here
    parser.add_argument("--repeat", type=int, default=21, help="warm turns")
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--settle", type=float, default=None, help="default: the daemon's")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon, by part")
    args = parser.parse_args(list(argv))
    figures = bench_daemon(
        args.images, args.size, args.steps, args.repeat, args.files,
        settle_seconds=args.settle, threads=args.threads, profile=args.profile,
    )  # fmt: skip
    print_figures(figures)


if __name__ == "__main__":
    main(sys.argv[1:])
