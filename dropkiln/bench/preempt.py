"""Preemption latency: a prompt file taken while training runs → its first denoising step.

A daemon runs in this process with one long training job (the dataset at the largest
resolution this machine trains at in reasonable time: ``--resolution``, 512 px on the CPU
by default, 1024 for a GPU run). Each of N prompt files is dropped while that job is
running, and the latency is read from the event log: the prompt file's ``Dropped`` event
(taken) to the generate job's first ``JobProgress`` (its first denoising step). Split
into ``JobPreempted`` (the training job noticed and saved its checkpoint) and the rest
(the generate job starting and its first step). The next file is dropped only once the
training job has resumed and made a step, so every drop meets a running training job.

``preempt_after_s`` is 0 here: it is a minimum run time the scheduler adds on top (see
README), not part of how fast a running job yields.

Run ``python -m dropkiln.bench.preempt [--drops N] [--resolution PX]``.
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

from dropkiln.bench.cache import link_models, write_bench_dataset
from dropkiln.bench.generate import write_prompt_files
from dropkiln.bench.record import SuiteRecord
from dropkiln.config import Settings
from dropkiln.store.vocabulary import JobState

POLL_S = 0.05
"""The figures come from event timestamps; polling only decides when to drop the next file."""


def bench_preempt(
    drops: int = 5, resolution: int = 512, images: int = 4, batch_size: int = 2,
    accumulation: int = 2, gen_size: int = 64, gen_steps: int = 2, model: str = "tiny-sdxl",
    models_dir: Path | None = None, device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Latency of each of ``drops`` prompt files taken during a training run."""
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-preempt-") as scratch:
        root = Path(scratch)
        link_models(root, models_dir)
        settings = Settings.load(
            root=root, model=model, device=device, settle_seconds=0.05, preempt_after_s=0
        )
        settings.train.steps = 1_000_000
        settings.train.checkpoint_every = 1_000_000
        settings.train.batch_size = batch_size
        settings.train.gradient_accumulation = accumulation
        settings.train.rank = 4
        settings.bucket.resolution = resolution
        settings.bucket.max_side = max(settings.bucket.max_side, resolution)
        settings.bucket.min_side = min(settings.bucket.min_side, resolution // 2)
        run = _PreemptRun(settings, images, resolution, gen_size, gen_steps)
        figures = anyio.run(run.drive, drops)
    figures.update(
        {
            "model": model,
            "resolution": resolution,
            "micro_batches_per_step": accumulation,
            "batch_size": batch_size,
            "generate_size": gen_size,
            "generate_steps": gen_steps,
            "load_average_after": round(os.getloadavg()[0], 2),
        }
    )
    return figures


class _PreemptRun:
    def __init__(
        self, settings: Settings, images: int, resolution: int, gen_size: int, gen_steps: int
    ) -> None:
        self.settings = settings
        self.images, self.resolution = images, resolution
        self.gen_size, self.gen_steps = gen_size, gen_steps

    async def drive(self, drops: int) -> dict[str, Any]:
        from dropkiln.daemon.service import Daemon
        from dropkiln.store.events import CancelRequested, job_stream

        daemon = Daemon(self.settings)
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: daemon.run(handle_signals=False))
            await daemon.started.wait()
            try:
                # made aside, then moved into view in one rename, as a careful user does
                staging = self.settings.root / "staging"
                write_bench_dataset(staging, "preempt", self.images, self.resolution)
                (staging / "drop" / "datasets" / "preempt").rename(
                    self.settings.paths.datasets / "preempt"
                )
                train = await self._train_job(daemon)
                step_s = await self._step_seconds(daemon, train)
                rows = [await self._one_drop(daemon, train, n) for n in range(drops)]
                await daemon.store.append(job_stream(train), [CancelRequested(by="benchmark")])
            finally:
                daemon.stop("benchmark finished")
        return {
            "device": daemon.device,
            "drops": drops,
            "train_step_s": step_s,
            "taken_to_first_step_s": [r["first_step_s"] for r in rows],
            "taken_to_preempted_s": [r["preempted_s"] for r in rows],
        }

    async def _train_job(self, daemon: Any) -> str:
        from dropkiln.store import list_jobs

        while True:
            await anyio.sleep(POLL_S)
            jobs = await list_jobs(daemon.store)
            failed = [j for j in jobs if j.state == JobState.FAILED]
            if failed:
                raise RuntimeError(f"{failed[0].stage} job failed: {failed[0].error}")
            train = next(
                (j for j in jobs if j.stage == "train" and j.state == JobState.RUNNING), None
            )
            if train is not None and train.done >= 1:
                return train.id

    async def _step_seconds(self, daemon: Any, train: str) -> float:
        """Seconds per training step at this resolution, over a few steps."""
        from dropkiln.store import find_job

        first = await find_job(daemon.store, train)
        started = time.monotonic()
        while (job := await find_job(daemon.store, train)).done < first.done + 3:
            await anyio.sleep(POLL_S)
        return round((time.monotonic() - started) / (job.done - first.done), 3)

    async def _one_drop(self, daemon: Any, train: str, number: int) -> dict[str, float]:
        from dropkiln.store import find_job, list_jobs
        from dropkiln.store.events import job_stream

        before = await find_job(daemon.store, train)
        stem = f"now{number:02d}"
        (built,) = write_prompt_files(
            self.settings.root / "staging", [[f"a lighthouse {number}"]], self.gen_steps,
            self.gen_size, prefix=stem,
        )  # fmt: skip
        built.rename(self.settings.paths.prompts / f"{stem}.toml")
        while True:
            await anyio.sleep(POLL_S)
            jobs = {j.name: j for j in await list_jobs(daemon.store) if j.stage == "generate"}
            job = jobs.get(stem)
            if job is not None and job.terminal:
                break
        if job.state != JobState.SUCCEEDED:
            raise RuntimeError(f"generate job {stem} ended {job.state}: {job.error}")
        taken = await self._dropped_at(daemon, stem)
        generate = await daemon.store.read(0, stream=job_stream(job.id), limit=None)
        first_step = next(e for e in generate if e.type == "JobProgress")
        trained = await daemon.store.read(0, stream=job_stream(train), limit=None)
        preempted = [e for e in trained if e.type == "JobPreempted"][-1]
        # the training job resumed and made a step: the next drop meets it running
        while True:
            job_now = await find_job(daemon.store, train)
            if job_now.state == JobState.RUNNING and job_now.done > before.done:
                break
            await anyio.sleep(POLL_S)
        return {
            "first_step_s": _seconds(taken, first_step.at),
            "preempted_s": _seconds(taken, preempted.at),
        }

    async def _dropped_at(self, daemon: Any, stem: str) -> str:
        from dropkiln.store import list_drops

        drop = next(d for d in await list_drops(daemon.store) if d["name"] == stem)
        return str(drop["at"])


def _seconds(start: str, end: str) -> float:
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 4)


def preempt_suite(options: Any, profiler: Any) -> SuiteRecord:
    """``dropkiln bench preempt``: the figures of ``bench_preempt`` as a suite record."""
    gpu = str(options.device).startswith("cuda")
    config: dict[str, Any] = {
        "drops": options.pick(options.repeats, 10, 3),
        "resolution": options.pick(options.resolution, 1024 if gpu else 512, 128),
        "model": options.model,
        "device": options.device,
    }
    figures = bench_preempt(**config, models_dir=options.models_dir)
    record = preempt_record(figures, config)
    if profiler is not None:
        record.notes.append("--profile: not profiled (the daemon runs its own threads)")
    return record


def preempt_record(figures: dict[str, Any], config: dict[str, Any]) -> SuiteRecord:
    record = SuiteRecord("preempt", config=config)
    latencies = figures.pop("taken_to_first_step_s")
    record.latencies(
        "taken_to_first_step", latencies, "prompt file taken → its first denoising step"
    )
    record.latencies(
        "taken_to_preempted", figures.pop("taken_to_preempted_s"), "taken → training yielded"
    )
    record.metric("preempt_p50_s", round(sorted(latencies)[len(latencies) // 2], 3), "s",
                  "lower", headline=True)  # fmt: skip
    record.metric("preempt_max_s", round(max(latencies), 3), "s", "lower", headline=True)
    record.metric("train_step_s", figures["train_step_s"], "s", None)
    record.compared(
        "one training step (a preemption used to wait for the whole step)",
        sorted(latencies)[len(latencies) // 2] / figures["train_step_s"],
        "p50 taken → first denoising step ÷ seconds per training step",
        "< 1",
    )
    record.notes.append(
        f"{figures['drops']} prompt files, each taken while a {figures['resolution']} px"
        f" training job ({figures['micro_batches_per_step']} micro-batches a step,"
        f" {figures['train_step_s']} s a step) ran; preempt_after_s = 0 (a minimum run time"
        " the scheduler adds on top, see README)"
    )
    record.raw = figures
    return record


def main(argv: Sequence[str] = ()) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.preempt")
    parser.add_argument("--drops", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(list(argv))
    torch.set_num_threads(args.threads)
    figures = bench_preempt(args.drops, args.resolution)
    latencies = sorted(figures["taken_to_first_step_s"])
    print(
        f"{args.drops} drops during {args.resolution} px training"
        f" ({figures['train_step_s']} s/step): taken → first denoising step"
        f" p50 {latencies[len(latencies) // 2]:.3f} s, max {latencies[-1]:.3f} s"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
