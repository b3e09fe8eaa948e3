"""Generation through a running daemon: a prompt file dropped → its last PNG written.

Two comparisons, both in this process with the daemon running in-process:

- warm: each prompt file through the daemon (model warm) against the same images from
  direct diffusers calls on the same pipeline, interleaved, with the time from the drop
  to the job's start (watcher debounce, ``settle_seconds``, ingest, planning) split out;
- a row of prompt files dropped at once through the daemon (model cold, loaded once)
  against one process per file that imports torch, loads the model and renders it.

Run ``python -m dropkiln.bench.daemon [--images N] [--size PX] [--steps N] [--files N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from dropkiln.bench.cache import link_models
from dropkiln.bench.generate import direct_images, script_per_job, write_prompt_files
from dropkiln.config import Settings
from dropkiln.stages.prompts import ImageEntry

POLL_S = 0.2
"""How often to ask whether the jobs are done: the times come from the PNGs' mtimes and the
jobs' start events, so a slow poll loses no precision and takes no CPU from the daemon."""


def bench_daemon(
    images: int = 2, size: int = 128, steps: int = 8, repeat: int = 5, files: int = 10,
    file_images: int = 1, model: str = "tiny-sdxl", models_dir: Path | None = None,
    settle_seconds: float = 0.05, device: str = "cpu", processes: bool = True, warmup: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Warm drops against direct calls, and a row of files against a process per file."""
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        link_models(root, models_dir)
        settings = Settings.load(
            root=root, model=model, device=device, settle_seconds=settle_seconds
        )
        run = _DaemonRun(settings, images, size, steps)
        figures = anyio.run(run.drive, warmup, repeat, files, file_images)
        if processes:
            figures["row"].update(_processes(run, files, file_images))
    figures.update(
        {
            "model": model,
            "images_per_file": images,
            "size": size,
            "steps": steps,
            "settle_seconds": settle_seconds,
            "warmup": warmup,
            "load_average_after": round(os.getloadavg()[0], 2),
        }
    )
    return figures


class _DaemonRun:
    def __init__(self, settings: Settings, images: int, size: int, steps: int) -> None:
        self.settings = settings
        self.images, self.size, self.steps = images, size, steps
        self.staging = settings.root / "staging"
        self.prompt_sets: dict[str, list[str]] = {}
        self.device = "cpu"

    async def drive(self, warmup: int, repeat: int, files: int, file_images: int) -> dict[str, Any]:
        from dropkiln.daemon.service import Daemon

        daemon = Daemon(self.settings)
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: daemon.run(handle_signals=False))
            await daemon.started.wait()
            self.device = daemon.device
            try:
                warm = await self._warm(daemon, warmup, repeat)
                row = await self._row(daemon, files, file_images)
            finally:
                daemon.stop("benchmark finished")
        return {"device": self.device, "warm": warm, "row": row}

    async def _warm(self, daemon: Any, warmup: int, repeat: int) -> dict[str, Any]:
        for number in range(warmup):
            # a first drop loads the model; its time belongs to neither side
            await self._drop_and_wait(daemon, [f"warm-up{number}"], [[f"warm-up {number}"]])
        through, direct, pickup, run = [], [], [], []
        same = True
        for attempt in range(repeat):
            stem = f"warm{attempt:02d}"
            prompts = [f"a lighthouse, drop {attempt} image {n}" for n in range(self.images)]
            (job,) = await self._drop_and_wait(daemon, [stem], [prompts])
            through.append(job["latency_s"])
            pickup.append(job["pickup_s"])
            run.append(job["latency_s"] - job["pickup_s"])
            seconds, first = await anyio.to_thread.run_sync(self._direct, prompts, attempt)
            direct.append(seconds)
            same = same and _same_pixels(Path(job["images"][0]), first)
        best_direct = min(direct)
        return {
            "repeat": repeat,
            "daemon_s": through,
            "direct_s": direct,
            "pickup_s": pickup,
            "run_s": run,
            "daemon_best_s": round(min(through), 4),
            "direct_best_s": round(best_direct, 4),
            "ratio": round(min(through) / best_direct, 3),
            "ratio_after_pickup": round(min(run) / best_direct, 3),
            "same_images": same,
        }

    async def _row(self, daemon: Any, files: int, file_images: int) -> dict[str, Any]:
        from dropkiln.stages.models import shared_pipelines

        # A cold model, as in a freshly started daemon: the row pays for one load.
        shared_pipelines().clear()
        stems = [f"row{number:02d}" for number in range(files)]
        prompt_sets = [[f"file {f} image {n}" for n in range(file_images)] for f in range(files)]
        jobs = await self._drop_and_wait(daemon, stems, prompt_sets)
        total = max(job["latency_s"] for job in jobs)
        return {
            "files": files,
            "images_per_file": file_images,
            "daemon_s": round(total, 3),
            "daemon_file_s": [job["latency_s"] for job in jobs],
        }

    async def _drop_and_wait(
        self, daemon: Any, stems: list[str], prompt_sets: list[list[str]]
    ) -> list[dict[str, Any]]:
        """Drop the files together; per file: drop → job start, drop → its last PNG."""
        from dropkiln.store import list_drops, list_jobs

        built = write_prompt_files(self.staging, prompt_sets, self.steps, self.size, prefix="")
        dropped = self.settings.paths.prompts
        dropped_at = time.time()
        for stem, path in zip(stems, built, strict=True):
            self.prompt_sets[stem] = prompt_sets[stems.index(stem)]
            path.rename(dropped / f"{stem}.toml")
        while True:
            await anyio.sleep(POLL_S)
            failed = [d for d in await list_drops(daemon.store) if d["state"] == "failed"]
            if failed:
                raise RuntimeError(f"drop {failed[0]['name']} rejected: {failed[0]['reason']}")
            jobs = {j.name: j for j in await list_jobs(daemon.store) if j.stage == "generate"}
            mine = [jobs.get(stem) for stem in stems]
            if all(job is not None and job.terminal for job in mine):
                break
        results = []
        for job in mine:
            assert job is not None
            if job.state != "succeeded" or job.result is None or job.started_at is None:
                raise RuntimeError(f"generate job {job.name} ended {job.state}: {job.error}")
            last_png = max(Path(p).stat().st_mtime for p in job.result["images"])
            started = datetime.fromisoformat(job.started_at).timestamp()
            results.append(
                {
                    "images": job.result["images"],
                    "pickup_s": started - dropped_at,
                    "latency_s": last_png - dropped_at,
                }
            )
        return results

    def _direct(self, prompts: list[str], attempt: int) -> tuple[float, Any]:
        """The file's images from direct calls on the daemon's warm pipeline, saved as PNG."""
        from dropkiln.stages.generate import inference_dtype
        from dropkiln.stages.models import resolve_model, shared_pipelines

        ref = resolve_model(self.settings.model, self.settings.paths.models)
        pipe = shared_pipelines().get(ref, self.device, inference_dtype(self.device))
        entries = [
            ImageEntry(prompt=prompt, seed=1 + n, steps=self.steps, width=self.size,
                       height=self.size)
            for n, prompt in enumerate(prompts)
        ]  # fmt: skip
        out = self.settings.root / "direct" / str(attempt)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        pictures = []
        for entry in entries:
            (image,) = direct_images(pipe, [entry])
            image.save(out / f"{entry.seed}.png")
            pictures.append(image)
        return time.perf_counter() - started, pictures[0]


def _processes(run: _DaemonRun, files: int, file_images: int) -> dict[str, Any]:
    """The script-per-job way: one Python process per prompt file, each loading the model."""
    import torch

    from dropkiln.stages.models import resolve_model

    ref = resolve_model(run.settings.model, run.settings.paths.models)
    if ref.single_file:
        return {"processes_s": None, "note": "single-file models: no process comparison"}
    prompt_sets = [run.prompt_sets[f"row{number:02d}"] for number in range(files)]
    seconds = script_per_job(
        ref.path, run.settings.root / "scripts", prompt_sets, run.steps, run.size,
        torch.get_num_threads(),
    )  # fmt: skip
    total = sum(seconds)
    return {"processes_s": round(total, 3), "process_file_s": seconds}


def _same_pixels(path: Path, image: Any) -> bool:
    import numpy as np
    from PIL import Image

    with Image.open(path) as written:
        return bool(np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image)))


def main(argv: Sequence[str] = ()) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.daemon")
    parser.add_argument("--images", type=int, default=2, help="images per warm prompt file")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(list(argv))
    torch.set_num_threads(args.threads)
    figures = bench_daemon(args.images, args.size, args.steps, args.repeat, args.files)
    warm, row = figures["warm"], figures["row"]
    print(f"{figures['model']}, {args.size}x{args.size}, {args.steps} steps, "
          f"settle_seconds {figures['settle_seconds']}")  # fmt: skip
    print(f"warm: daemon {warm['daemon_best_s']:.3f}s (drop → last PNG), direct "
          f"{warm['direct_best_s']:.3f}s: ratio {warm['ratio']:.3f} (goal <= 1.05), "
          f"{warm['ratio_after_pickup']:.3f} after pickup")  # fmt: skip
    print(f"{row['files']} files: daemon {row['daemon_s']:.2f}s, "
          f"one process each {row.get('processes_s')}s")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
