"""A realistic store for the dashboard tests, written by the real store code at fixed times."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

from dropkiln.store import EventStore, record_telemetry
from dropkiln.store import eventstore as eventstore_module
from dropkiln.store.events import (
    DAEMON_STREAM,
    ArtifactWritten,
    CheckpointSaved,
    DaemonStarted,
    Dropped,
    Event,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    OutOfMemory,
    RetryScheduled,
    drop_stream,
    job_stream,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()
NOW = T0 + 602.0
"""The dashboard's frozen clock: two seconds after the last heartbeat."""

GENERATE_FAILED = "g5f0d1e8a2c4"
BUCKET = "b0c4e7a1f9d2"
CACHE = "c4c1e2d3b5a6"
TRAIN = "t7a9b3f2e1c0"
GENERATE_QUEUED = "g2a7c9e4d1b3"
VIDEO = "v9e8d7c6b5a4"
GIB = 1024**3

SNAPSHOT = {"allocated": 7 * GIB, "reserved": 8 * GIB, "peak": 8 * GIB, "free": 0, "total": 8 * GIB}


def training_loss(step: int) -> float:
    return round(0.32 * math.exp(-step / 700) + 0.06 + 0.01 * math.sin(step / 7), 4)


class HistoryWriter:
    """Appends events as if each were written at ``T0 + seconds``."""

    def __init__(self) -> None:
        self.store: EventStore | None = None
        self.seconds = 0.0

    def now_iso(self) -> str:
        return datetime.fromtimestamp(T0 + self.seconds, UTC).isoformat(timespec="microseconds")

    async def at(self, seconds: float, stream: str, *events: Event) -> None:
        self.seconds = seconds
        assert self.store is not None
        await self.store.append(stream, list(events))

    async def submit(self, seconds: float, job_id: str, stage: str, name: str, **extra: object):
        lane = "cpu" if stage in ("bucket", "video") else "gpu"
        submitted = JobSubmitted(
            job_id=job_id, stage=stage, name=name, lane=lane, priority=10, spec={}, **extra
        )  # type: ignore[arg-type]
        await self.at(seconds, job_stream(job_id), submitted, JobQueued())


async def write_history(path: Path) -> None:
    """Daemon up on a CPU box; a failed generation, a finished bucket and cache, a training
    job running on rung 1 after an OOM, a queued generation and a video waiting on it."""
    writer = HistoryWriter()
    with mock.patch.object(eventstore_module, "utc_now", writer.now_iso):
        writer.store = store = await EventStore.open(path, create=True)
        try:
            await _write(writer)
            for second in range(120):
                at = T0 + 481 + second
                used = int(1.3 * GIB + 0.25 * GIB * math.sin(second / 9))
                sample = {
                    "at": at, "device": "cpu", "allocated": used, "reserved": used,
                    "peak": int(1.62 * GIB), "free": 20 * GIB, "total": 24 * GIB, "rss": used,
                    "job_id": TRAIN, "memory_rung": 1,
                }  # fmt: skip
                await record_telemetry(store, sample, retention_s=3600)
        finally:
            await store.close()


async def _write(w: HistoryWriter) -> None:
    started = DaemonStarted(pid=4242, host="kiln", version="0.1.0", device="cpu", root="/srv/dk")
    await w.at(0, DAEMON_STREAM, started)
    await _failed_generation(w)
    await w.at(100, drop_stream("d-cats"), _dropped("d-cats", "dataset", "cats", 25))
    await w.submit(101, BUCKET, "bucket", "cats", drop_id="d-cats")
    await w.submit(101, CACHE, "cache", "cats", depends_on=[BUCKET])
    await w.submit(101, TRAIN, "train", "cats", depends_on=[CACHE])
    bucket = job_stream(BUCKET)
    await w.at(102, bucket, JobStarted(attempt=1, memory_rung=0))
    await w.at(110, bucket, JobProgress(done=25, total=25))
    manifest = "/srv/dk/state/work/b0c4e7a1f9d2/manifest.json"
    await w.at(111, bucket, ArtifactWritten(path=manifest, kind="manifest", bytes=18_211))
    await w.at(112, bucket, JobSucceeded(result={"manifest": manifest, "images": 24}))
    cache = job_stream(CACHE)
    await w.at(113, cache, JobStarted(attempt=1, memory_rung=0))
    await w.at(130, cache, JobProgress(done=24, total=24, metrics={"it_s": 1.4}))
    await w.at(135, cache, JobSucceeded(result={"shards": 2}))
    await _training(w)
    await w.at(300, drop_stream("d-portraits"), _dropped("d-portraits", "prompts", "portraits", 1))
    await w.submit(300, GENERATE_QUEUED, "generate", "portraits", drop_id="d-portraits")
    await w.submit(300, VIDEO, "video", "portraits", depends_on=[GENERATE_QUEUED])
    await _training_progress(w, first=320, last=600)


def _dropped(drop_id: str, kind: str, name: str, files: int) -> Dropped:
    return Dropped(
        drop_id=drop_id,
        kind=kind,
        name=name,
        source=f"/srv/dk/drop/{name}",
        stored=f"/srv/dk/drop/processed/{name}",
        hash=f"sha256:{name}",
        files=files,
        bytes=files * 400_000,
    )


async def _failed_generation(w: HistoryWriter) -> None:
    stream = job_stream(GENERATE_FAILED)
    await w.at(10, drop_stream("d-space"), _dropped("d-space", "prompts", "spacecats", 1))
    await w.submit(11, GENERATE_FAILED, "generate", "spacecats", drop_id="d-space")
    preview = "/srv/dk/outputs/images/spacecats/preview-{:04d}.png"
    oom = "CUDA out of memory. Tried to allocate 2.00 GiB"
    await w.at(12, stream, JobStarted(attempt=1, memory_rung=0, rung_name="default"))
    await w.at(20, stream, JobProgress(done=4, total=20, metrics={"it_s": 0.8, "eta_s": 20}))
    await w.at(25, stream, ArtifactWritten(path=preview.format(4), kind="preview", bytes=20_480))
    await w.at(30, stream, OutOfMemory(memory_rung=0, rung_name="default", snapshot=SNAPSHOT,
                                       message=oom))  # fmt: skip
    await w.at(30, stream, RetryScheduled(next_rung=1, rung_name="attention_slicing"))
    await w.at(31, stream, JobStarted(attempt=2, memory_rung=1, rung_name="attention_slicing"))
    await w.at(40, stream, JobProgress(done=8, total=20, metrics={"it_s": 0.7, "eta_s": 17}))
    await w.at(42, stream, ArtifactWritten(path=preview.format(8), kind="preview", bytes=20_480))
    await w.at(50, stream, OutOfMemory(memory_rung=1, rung_name="attention_slicing",
                                       snapshot=SNAPSHOT, message=oom))  # fmt: skip
    reason = "out of memory on the last memory rung allowed (attention_slicing): " + oom
    await w.at(50, stream, JobFailed(reason=reason))


async def _training(w: HistoryWriter) -> None:
    stream = job_stream(TRAIN)
    await w.at(140, stream, JobStarted(attempt=1, memory_rung=0, rung_name="default"))
    for step in range(25, 175, 25):
        metrics = {"loss": training_loss(step), "lr": 1e-4, "it_s": 2.5, "step": step}
        await w.at(140 + step * 0.4, stream, JobProgress(done=step, total=2000, metrics=metrics))
    await w.at(205, stream, OutOfMemory(memory_rung=0, rung_name="default", snapshot=SNAPSHOT,
                                        message="CUDA out of memory"))  # fmt: skip
    await w.at(205, stream, RetryScheduled(next_rung=1, rung_name="gradient_checkpointing",
                                           resume_from={"step": 150}))  # fmt: skip
    await w.at(
        207, stream, JobStarted(attempt=2, memory_rung=1, rung_name="gradient_checkpointing")
    )


async def _training_progress(w: HistoryWriter, first: int, last: int) -> None:
    stream = job_stream(TRAIN)
    steps = range(175, 625, 25)
    for index, step in enumerate(steps):
        seconds = first + (last - first) * index / (len(steps) - 1)
        metrics = {
            "loss": training_loss(step), "lr": 1e-4, "it_s": 3.2,
            "eta_s": (2000 - step) / 3.2, "step": step,
        }  # fmt: skip
        await w.at(seconds, stream, JobProgress(done=step, total=2000, metrics=metrics))
        if step % 250 == 0:
            state = {"step": step, "files": [f"lora-{step:06d}.safetensors"]}
            await w.at(seconds, stream, CheckpointSaved(state=state))
