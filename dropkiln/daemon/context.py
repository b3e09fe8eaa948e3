"""The StageContext the daemon hands a running stage (on the device thread, or a worker).

Reports go back to the event loop, which owns the database: checkpoints and artifacts wait
until their event is committed (so a kill right after never loses a record of a file that
exists). Progress does not: the stage leaves its latest report here and goes on, and the
executor records it about twice a second and with the job's end (``take_pending_progress``);
an attempt's first report is always recorded, so the log shows where a resumed attempt began.
A kill loses at most the last half second of progress, which the next attempt reports anew;
waiting for that commit cost a stage 8-36 ms per generate job and 0.2-0.3 s per train job.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import anyio.from_thread
from anyio.lowlevel import EventLoopToken

from dropkiln.stages.base import Artifact, StageStopped
from dropkiln.stages.faults import FaultInjector
from dropkiln.store.events import (
    ArtifactWritten,
    CheckpointSaved,
    CheckpointUnusable,
    Event,
    JobProgress,
)
from dropkiln.store.leases import LeaseLost

PROGRESS_EVERY_S = 0.5
"""How often the executor records a running job's latest progress."""
LEASE_LOST = "lease lost"
"""The stop reason of an attempt whose lease is gone: it records nothing more."""

AppendFn = Callable[[list[Event]], Coroutine[Any, Any, None]]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DaemonContext:
    """One attempt of one job."""

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        memory_rung: int,
        device: str,
        root: Path,
        work_dir: Path,
        resume: dict[str, Any] | None,
        upstream: dict[str, dict[str, Any]],
        faults: FaultInjector,
        recorded: dict[str, str | None] | None = None,
        append: AppendFn,
        token: EventLoopToken,
        lease_s: float = float("inf"),
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.memory_rung = memory_rung
        self.device = device
        self.root = root
        self.work_dir = work_dir
        self._resume = resume
        self._upstream = upstream
        self._recorded = dict(recorded or {})
        """path → sha256 of the artifacts already recorded for this job (earlier attempts)."""
        self._faults = faults
        self._append = append
        self._token = token
        self._stop = threading.Event()
        self.stop_reason: str | None = None
        self.last_sign_of_life = time.monotonic()
        """When the stage last called its context: a stage silent for ``stall_after_s`` is
        taken for hung (the watchdog stops pinging, shutdown stops waiting)."""
        self._pending_progress: JobProgress | None = None
        self._first_report: JobProgress | None = None
        """The attempt's first report, kept apart until it is recorded."""
        self._reported = False
        self._progress_lock = threading.Lock()
        self.latest_metrics: dict[str, Any] = {}
        self._lease_s = lease_s
        self._lease_ends = time.monotonic() + lease_s
        """When the lease runs out by this process's clock, counted from before the claim or
        the last renewal was asked for, so never later than the store's ``lease_until``."""

    # Called from the event loop ------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the stage to checkpoint and stop (cancel, preempt or shutdown). A lost lease
        overrides every other reason: nothing may be recorded then, not even a cancel."""
        if self.stop_reason == LEASE_LOST:
            return
        if self.stop_reason is None or reason in ("cancel", LEASE_LOST):
            self.stop_reason = reason
        self._stop.set()

    def lease_renewed(self, asked_at: float) -> None:
        """A renewal asked for at ``asked_at`` (monotonic) was committed."""
        self._lease_ends = asked_at + self._lease_s

    @property
    def lease_lost(self) -> bool:
        """The lease ran out on this clock without a renewal (after a SIGSTOP, a stalled
        loop, an unreachable store), or the store refused a write or a renewal."""
        if self.stop_reason != LEASE_LOST and time.monotonic() > self._lease_ends:
            self.request_stop(LEASE_LOST)
        return self.stop_reason == LEASE_LOST

    def take_pending_progress(self) -> list[JobProgress]:
        """The progress not yet recorded, in order (the caller records it)."""
        with self._progress_lock:
            pending = [p for p in (self._first_report, self._pending_progress) if p is not None]
            self._first_report = self._pending_progress = None
        return pending

    # Called from the stage's thread ---------------------------------------------------------

    def _send(self, events: list[Event]) -> None:
        """Record events of this attempt; a stage whose lease is lost is stopped instead
        (StageStopped), before it writes or when the store refuses the write."""
        if self.lease_lost:
            raise StageStopped(LEASE_LOST)
        try:
            anyio.from_thread.run(self._append, events, token=self._token)
        except LeaseLost:
            self.request_stop(LEASE_LOST)
            raise StageStopped(LEASE_LOST) from None

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        """Kept for the executor to record; the stage does not wait for a commit."""
        self.last_sign_of_life = time.monotonic()
        event = JobProgress(done=done, total=total, metrics=_jsonable(metrics))
        self.latest_metrics = event.metrics
        with self._progress_lock:
            if self._reported:
                self._pending_progress = event
            else:
                self._reported, self._first_report = True, event

    def checkpoint(self, state: dict[str, Any], artifacts: Sequence[Artifact] = ()) -> None:
        self.last_sign_of_life = time.monotonic()
        events: list[Event] = [*self.take_pending_progress()]
        records = [record for record in map(self._unrecorded, artifacts) if record is not None]
        # one commit for the checkpoint and the files it covers, not one per file
        self._send([*events, *records, CheckpointSaved(state=_jsonable(state))])
        self._resume = state
        self._recorded.update((record.path, record.sha256) for record in records)

    def resume_state(self) -> dict[str, Any] | None:
        return self._resume

    def checkpoint_unusable(self, checkpoint: str, reason: str, resumed_from_step: int) -> None:
        unusable = CheckpointUnusable(
            checkpoint=checkpoint, reason=reason[:500], resumed_from_step=resumed_from_step
        )
        self._send([unusable])

    def artifact(self, path: Path, kind: str, sha256: str | None = None) -> None:
        self.last_sign_of_life = time.monotonic()
        record = self._unrecorded(Artifact(Path(path), kind, sha256))
        if record is None:
            return  # recorded by an earlier attempt: a stage re-reports what it finds on disk
        # the progress reported before the file goes first: the log keeps the stage's order
        self._send([*self.take_pending_progress(), record])
        self._recorded[record.path] = record.sha256

    def _unrecorded(self, artifact: Artifact) -> ArtifactWritten | None:
        """The record of ``artifact``, or None when this job recorded the same bytes before."""
        path = Path(artifact.path)
        digest = artifact.sha256 or file_sha256(path)
        if self._recorded.get(str(path)) == digest:
            return None
        size = path.stat().st_size
        return ArtifactWritten(path=str(path), kind=artifact.kind, bytes=size, sha256=digest)

    def should_stop(self) -> bool:
        self.last_sign_of_life = time.monotonic()
        return self.lease_lost or self._stop.is_set()

    def upstream(self, stage: str) -> dict[str, Any]:
        try:
            return self._upstream[stage]
        except KeyError:
            raise KeyError(f"job {self.job_id} has no finished {stage} dependency") from None

    def fault(self, point: str) -> None:
        self.last_sign_of_life = time.monotonic()
        self._faults.hit(point)

    def deferred_fault(self, point: str) -> str | None:
        return self._faults.deferred(point)


def _jsonable(value: Any) -> Any:
    """Numbers from numpy/torch become plain floats so metrics serialise."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
