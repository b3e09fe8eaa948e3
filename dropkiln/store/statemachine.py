"""The job state machine written out on its own, to check a log against it.

``store check`` must be able to see a history that the live code got wrong, so nothing
here calls the projections: the legal transitions are this module's own table, and the
rules below read the raw events. A history the daemon should never write (a job that
ended twice, started after it ended, versions with a gap, an artifact whose file is gone
or changed) is reported as a violation with the stream, version and events involved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropkiln.store.rawsql import SqlConnection
from dropkiln.store.vocabulary import JobState

NEW = "new"  # before JobSubmitted
QUEUED = JobState.QUEUED  # includes waiting: dependencies are not part of the stream
RUNNING = JobState.RUNNING
CLAIMED = "claimed"  # between JobClaimed and JobStarted (one transaction)
OUT_OF_MEMORY = "out of memory"  # between OutOfMemory and the retry or the failure
SUCCEEDED = JobState.SUCCEEDED
FAILED = JobState.FAILED
CANCELLED = JobState.CANCELLED

TERMINAL_EVENTS = frozenset({"JobSucceeded", "JobFailed", "JobCancelled"})
REQUEUES = frozenset({"JobQueued", "RetryScheduled", "JobPreempted", "JobInterrupted"})
COMMANDS = frozenset({"CancelRequested", "RetryRequested"})

# What a running attempt reports about itself; the job stays running. A new event a stage
# emits while it runs belongs here (and any other new job event in TRANSITIONS), or
# `store check` calls it illegal.
REPORTS_WHILE_RUNNING = frozenset(
    {"JobProgress", "CheckpointSaved", "CheckpointUnusable", "ArtifactWritten"}
)

# (state, event type) -> next state. Anything not listed is illegal.
TRANSITIONS: dict[tuple[str, str], str] = {
    (NEW, "JobSubmitted"): QUEUED,
    (QUEUED, "JobQueued"): QUEUED,  # the first JobQueued after JobSubmitted
    (FAILED, "JobQueued"): QUEUED,  # retried
    (CANCELLED, "JobQueued"): QUEUED,  # retried
    (QUEUED, "JobClaimed"): CLAIMED,
    (CLAIMED, "JobStarted"): RUNNING,
    (QUEUED, "JobStarted"): RUNNING,  # logs written before claims
    **{(RUNNING, report): RUNNING for report in REPORTS_WHILE_RUNNING},
    (RUNNING, "JobSucceeded"): SUCCEEDED,
    (RUNNING, "JobFailed"): FAILED,
    (QUEUED, "JobFailed"): FAILED,  # a dependency failed before it ran
    (RUNNING, "JobCancelled"): CANCELLED,
    (QUEUED, "JobCancelled"): CANCELLED,  # cancelled before it ran, or its dependency was
    (RUNNING, "OutOfMemory"): OUT_OF_MEMORY,
    (OUT_OF_MEMORY, "RetryScheduled"): QUEUED,
    (OUT_OF_MEMORY, "JobFailed"): FAILED,  # no rung left
    (RUNNING, "JobPreempted"): QUEUED,
    (RUNNING, "JobInterrupted"): QUEUED,  # found running by the next daemon
}
# Where an illegal event leaves the job, so the rules after it still read sensibly.
LANDS_IN = {event: state for (_, event), state in TRANSITIONS.items()}


@dataclass
class _Job:
    state: str = NEW
    ended_by: tuple[str, int] | None = None  # the terminal event since the last requeue
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Stream:
    version: int = 0


class StateMachineCheck:
    """Feed events in seq order with ``see``; ``violations`` says what broke which rule."""

    def __init__(self, root: Path | None = None, files: bool = True) -> None:
        self.root = root
        self.files = files
        self.violations: list[str] = []
        self._jobs: dict[str, _Job] = {}
        self._streams: dict[str, _Stream] = {}

    def see(self, stream: str, version: int, type_name: str, data: dict[str, Any]) -> None:
        self._contiguous(stream, version)
        if stream.startswith("job:"):
            job_id = stream[4:]
            job = self._jobs.setdefault(job_id, _Job())
            self._transition(job_id, job, version, type_name)
            if type_name == "ArtifactWritten":
                job.artifacts[data["path"]] = data

    def finish(self) -> list[str]:
        """Run the rules that need the whole log; returns every violation."""
        if self.files:
            for job_id, job in self._jobs.items():
                for path, data in job.artifacts.items():
                    self._artifact(job_id, path, data)
        return self.violations

    # Rules ------------------------------------------------------------------------------

    def _contiguous(self, stream: str, version: int) -> None:
        """Versions of a stream are 1, 2, 3… in the order the events were committed."""
        seen = self._streams.setdefault(stream, _Stream())
        if version != seen.version + 1:
            self.violations.append(
                f"{stream}: version {version} follows version {seen.version} "
                "(versions must be contiguous)"
            )
        seen.version = version

    def _transition(self, job_id: str, job: _Job, version: int, type_name: str) -> None:
        state = job.state
        if type_name in COMMANDS:
            if state == NEW:
                self._illegal(job_id, version, type_name, state)
            return
        if type_name in TERMINAL_EVENTS and job.ended_by is not None:
            first, at = job.ended_by
            self.violations.append(
                f"job {job_id}: ended twice without a retry or requeue between: "
                f"{first} (v{at}) then {type_name} (v{version})"
            )
        if type_name == "JobStarted" and job.ended_by is not None:
            first, at = job.ended_by
            self.violations.append(
                f"job {job_id}: JobStarted (v{version}) after {first} (v{at}) "
                "with no retry or requeue between"
            )
        following = TRANSITIONS.get((state, type_name))
        if following is None:
            self._illegal(job_id, version, type_name, state)
            following = LANDS_IN.get(type_name, state)
        if type_name in TERMINAL_EVENTS:
            job.ended_by = job.ended_by or (type_name, version)
        elif type_name in REQUEUES:
            job.ended_by = None
        job.state = following

    def _illegal(self, job_id: str, version: int, type_name: str, state: str) -> None:
        self.violations.append(
            f"job {job_id}: {type_name} (v{version}) is not a legal transition from {state}"
        )

    def _artifact(self, job_id: str, path: str, data: dict[str, Any]) -> None:
        """The newest ArtifactWritten of each path names a file that is there, as recorded."""
        file = Path(path)
        if not file.is_absolute() and self.root is not None:
            file = self.root / file
        where = f"job {job_id}: artifact {path}"
        try:
            size = file.stat().st_size
        except OSError as exc:
            self.violations.append(f"{where}: missing ({exc.strerror or exc})")
            return
        if data.get("bytes") is not None and data["bytes"] != size:
            self.violations.append(f"{where}: {size} bytes on disk, {data['bytes']} recorded")
        if data.get("sha256") is not None and _sha256(file) != data["sha256"]:
            self.violations.append(f"{where}: sha256 on disk differs from the recorded one")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _events(conn: SqlConnection, chunk: int) -> Iterator[tuple[str, int, str, str]]:
    after = 0
    while True:
        rows = conn.execute(
            "SELECT seq, stream, version, type, data FROM events WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after, chunk),
        ).fetchall()
        if not rows:
            return
        for _seq, stream, version, type_name, data in rows:
            yield stream, version, type_name, data
        after = rows[-1][0]


def check_state_machine(
    conn: SqlConnection, root: Path | None = None, files: bool = True, chunk: int = 5000
) -> list[str]:
    """Every violation of the job state machine in the log read on ``conn``."""
    checker = StateMachineCheck(root, files)
    for stream, version, type_name, data in _events(conn, chunk):
        # Only artifacts need the payload; decoding every progress event would double the time.
        payload = json.loads(data) if type_name == "ArtifactWritten" else {}
        checker.see(stream, version, type_name, payload)
    return checker.finish()
