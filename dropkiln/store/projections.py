"""How each event changes the projections. Used live (same transaction) and by rebuild.

Every change here is a function of the event alone (no read-modify-write), so replaying
the log gives exactly the rows that were written live. Changes are plain data; `apply`
runs them as SQL text made once per shape, because the write path is hot (thousands of
events a second) and building a SQLAlchemy statement per event costs more than SQLite.
The rows and their SQL are in ``rows`` (no SQLAlchemy, no pydantic); commands' changes,
which need nothing but the event's type, in ``commands``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dropkiln.store import events as ev
from dropkiln.store.commands import command_changes
from dropkiln.store.rows import PROJECTIONS as PROJECTIONS
from dropkiln.store.rows import Changes, RowChange, artifacts, drops, jobs
from dropkiln.store.rows import apply as apply
from dropkiln.store.rows import changes_for as changes_for
from dropkiln.store.rows import clear as clear
from dropkiln.store.rows import job_update as _job_update
from dropkiln.store.stored import StoredEvent
from dropkiln.store.vocabulary import DropState, JobState


def _submitted(stored: StoredEvent, e: ev.JobSubmitted) -> Changes:
    row = {
        "id": e.job_id,
        "stage": e.stage,
        "name": e.name,
        "drop_id": e.drop_id,
        "lane": e.lane,
        "priority": e.priority,
        "depends_on": e.depends_on,
        "spec": e.spec,
        "rung_key": e.rung_key,
        "device_class": e.device_class,
        "state": JobState.QUEUED,
        "attempt": 0,
        "memory_rung": e.memory_rung,
        "done": 0,
        "total": 0,
        "metrics": {},
        "submitted_seq": stored.seq,
        "version": stored.version,
        "created_at": stored.at,
        "updated_at": stored.at,
    }
    return [RowChange(jobs, "insert", row)]


def _artifact(stored: StoredEvent, e: ev.ArtifactWritten) -> Changes:
    row = {
        "job_id": stored.job_id,
        "path": e.path,
        "seq": stored.seq,
        "kind": e.kind,
        "bytes": e.bytes,
        "sha256": e.sha256,
        "at": stored.at,
    }
    return [RowChange(artifacts, "upsert", row, key=("job_id", "path")), *_job_update(stored)]


def _drop(stored: StoredEvent, e: ev.Dropped | ev.DropRejected | ev.DropRecognised) -> Changes:
    row = {
        "id": e.drop_id,
        "kind": e.kind,
        "name": e.name,
        "source": e.source,
        "stored": e.stored,
        "hash": None if isinstance(e, ev.DropRejected) else e.hash,
        "state": DROP_STATES[type(e)],
        "reason": e.reason if isinstance(e, ev.DropRejected) else None,
        "duplicate_of": e.duplicate_of if isinstance(e, ev.DropRecognised) else None,
        "at": stored.at,
    }
    return [RowChange(drops, "insert", row)]


DROP_STATES: dict[type[ev.Event], DropState] = {
    ev.Dropped: DropState.INGESTED,
    ev.DropRejected: DropState.FAILED,
    ev.DropRecognised: DropState.DUPLICATE,
}


def _queued(s: StoredEvent, e: ev.JobQueued) -> Changes:
    return _job_update(s, state=JobState.QUEUED, error=None, finished_at=None, requested=None)


def _claimed(s: StoredEvent, e: ev.JobClaimed) -> Changes:
    return _job_update(s, executor=e.executor)


def _started(s: StoredEvent, e: ev.JobStarted) -> Changes:
    return _job_update(
        s, state=JobState.RUNNING, attempt=e.attempt, memory_rung=e.memory_rung, started_at=s.at
    )


def _progress(s: StoredEvent, e: ev.JobProgress) -> Changes:
    return _job_update(s, done=e.done, total=e.total, metrics=e.metrics)


def _checkpoint(s: StoredEvent, e: ev.CheckpointSaved) -> Changes:
    return _job_update(s, checkpoint=e.state)


def _succeeded(s: StoredEvent, e: ev.JobSucceeded) -> Changes:
    return _job_update(
        s, state=JobState.SUCCEEDED, result=e.result, finished_at=s.at, requested=None
    )


def _ended(s: StoredEvent, e: ev.JobFailed | ev.JobCancelled) -> Changes:
    state = JobState.FAILED if isinstance(e, ev.JobFailed) else JobState.CANCELLED
    return _job_update(s, state=state, error=e.reason, finished_at=s.at, requested=None)


def _requeued(s: StoredEvent, e: ev.OutOfMemory | ev.JobPreempted | ev.JobInterrupted) -> Changes:
    return _job_update(s, state=JobState.QUEUED)


def _retry_scheduled(s: StoredEvent, e: ev.RetryScheduled) -> Changes:
    return _job_update(s, state=JobState.QUEUED, memory_rung=e.next_rung)


def _requested(s: StoredEvent, e: ev.CancelRequested | ev.RetryRequested) -> Changes:
    # The rule the write path uses without reading the event (commands.py).
    return command_changes(s) or []


def _version_only(s: StoredEvent, e: ev.CheckpointUnusable) -> Changes:
    """A fact about the attempt that no column shows: only version and updated_at move."""
    return _job_update(s)


# Each projector takes the event class it is listed under (the tests apply every class).
Projector = Callable[[StoredEvent, Any], Changes]

PROJECTORS: dict[type[ev.Event], Projector] = {
    ev.JobSubmitted: _submitted,
    ev.JobQueued: _queued,
    ev.JobClaimed: _claimed,
    ev.JobStarted: _started,
    ev.JobProgress: _progress,
    ev.CheckpointSaved: _checkpoint,
    ev.CheckpointUnusable: _version_only,
    ev.ArtifactWritten: _artifact,
    ev.JobSucceeded: _succeeded,
    ev.JobFailed: _ended,
    ev.JobCancelled: _ended,
    ev.OutOfMemory: _requeued,
    ev.RetryScheduled: _retry_scheduled,
    ev.JobPreempted: _requeued,
    ev.JobInterrupted: _requeued,
    ev.CancelRequested: _requested,
    ev.RetryRequested: _requested,
    ev.Dropped: _drop,
    ev.DropRejected: _drop,
    ev.DropRecognised: _drop,
}

# Events no projection shows: the daemon's lifecycle and commands, drop moves (the drops
# row keeps where the drop was meant to go), the API's refusals, webhook deliveries.
NO_PROJECTION: frozenset[type[ev.Event]] = frozenset(
    {
        ev.DaemonStarted,
        ev.DaemonStopping,
        ev.DaemonStopped,
        ev.QueuePaused,
        ev.QueueResumed,
        ev.DropMoved,
        ev.DropMoveFailed,
        ev.DropMoveAbandoned,
        ev.DropWaiting,
        ev.ApiAuthFailed,
        ev.WebhookAttemptFailed,
        ev.WebhookDelivered,
        ev.WebhookGaveUp,
    }
)


def typed_changes(stored: StoredEvent) -> Changes:
    """The projection changes one event causes, read as its typed event.

    An event class in neither PROJECTORS nor NO_PROJECTION is an error, not a silent
    version bump: a renamed or new event must say what it does to the projections."""
    event = ev.parse_event(stored.type, stored.data)
    projector = PROJECTORS.get(type(event))
    if projector is not None:
        return projector(stored, event)
    if type(event) in NO_PROJECTION:
        return []
    raise ValueError(f"{stored.type} has no projection rule (PROJECTORS or NO_PROJECTION)")
