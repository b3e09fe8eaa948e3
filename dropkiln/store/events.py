"""One pydantic model per event type. Facts are past tense; commands are requests."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

# The stream names live with StoredEvent (standard library only, for the quick readers).
from dropkiln.store.stored import API_STREAM as API_STREAM
from dropkiln.store.stored import DAEMON_STREAM as DAEMON_STREAM
from dropkiln.store.stored import WEBHOOK_STREAM as WEBHOOK_STREAM
from dropkiln.store.stored import drop_stream as drop_stream
from dropkiln.store.stored import job_stream as job_stream
from dropkiln.store.vocabulary import TERMINAL_STATES as TERMINAL_STATES
from dropkiln.store.vocabulary import DropKind, Lane


class Event(BaseModel):
    """Base of every event; ``type`` is the class name."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    command: ClassVar[bool] = False
    """A request written by the CLI, the dashboard or the API, which the daemon tails and
    obeys; the daemon's list of commands to tail is every class that says so."""
    durable: ClassVar[bool] = False
    """Something irreversible follows its commit (a drop moved, older checkpoints pruned,
    outputs replaced or read by the next job), so the commit must survive a power cut:
    it is written with synchronous=FULL (the WAL is fsynced before the commit returns)."""

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


# Drops ------------------------------------------------------------------------------------


class Dropped(Event):
    durable: ClassVar[bool] = True
    drop_id: str
    kind: DropKind
    name: str
    source: str
    stored: str
    hash: str
    files: int
    bytes: int


class DropRejected(Event):
    durable: ClassVar[bool] = True
    drop_id: str
    kind: DropKind
    name: str
    source: str
    stored: str
    reason: str


class DropRecognised(Event):
    """Same content as an earlier drop: kept in processed/, no new work."""

    durable: ClassVar[bool] = True

    drop_id: str
    kind: DropKind
    name: str
    source: str
    stored: str
    hash: str
    duplicate_of: str


class DropMoved(Event):
    """The drop is at ``stored`` now: reconcile never touches its source path again."""

    stored: str


class DropMoveFailed(Event):
    """Moving the drop (or writing its NAME.error.txt) failed; it stays where it is and is
    tried again in ``retry_in_s``."""

    source: str
    stored: str
    reason: str
    attempt: int
    retry_in_s: float


class DropMoveAbandoned(Event):
    """Neither the drop nor its stored copy is where it was: nothing is left to move."""

    source: str
    reason: str


class DropWaiting(Event):
    """A drop is held back (a partial download inside it): says why, so it is not silent."""

    source: str
    reason: str
    waiting_s: float


# Jobs ---------------------------------------------------------------------------------------


class JobSubmitted(Event):
    job_id: str
    stage: str
    name: str
    lane: Lane
    priority: int
    spec: dict[str, Any]
    depends_on: list[str] = Field(default_factory=list)
    drop_id: str | None = None
    rung_key: str | None = None
    memory_rung: int = 0
    device_class: str | None = None
    """Only an executor of this device class may claim the job (None: any may)."""


class JobQueued(Event):
    reason: str = "submitted"


class JobClaimed(Event):
    """An executor took the queued job for its next attempt, with a lease until
    ``lease_until`` (seconds since the epoch, the store's clock) that its heartbeats renew
    while the attempt runs. Every write of the attempt carries ``attempt``; once the lease is
    lost (expired, and the job requeued or claimed again) the store refuses them."""

    executor: str
    """host/device of the daemon (``store.leases.executor_id``)."""
    attempt: int
    lease_until: float
    pid: int | None = None


class JobStarted(Event):
    attempt: int
    memory_rung: int
    rung_name: str = "default"
    rung_reason: str | None = None
    """Why this rung: default, estimate, remembered, re-probe or retry (None: older rows)."""


class JobProgress(Event):
    done: int
    total: int
    metrics: dict[str, Any] = Field(default_factory=dict)


class CheckpointSaved(Event):
    durable: ClassVar[bool] = True
    state: dict[str, Any]


class CheckpointUnusable(Event):
    """A saved checkpoint could not be restored (damaged, or not this job's shape); nothing of
    it was used, and the attempt went on from ``resumed_from_step`` (0: from the start)."""

    checkpoint: str
    reason: str
    resumed_from_step: int


class ArtifactWritten(Event):
    durable: ClassVar[bool] = True
    path: str
    kind: str
    bytes: int | None = None
    sha256: str | None = None


class JobSucceeded(Event):
    durable: ClassVar[bool] = True
    result: dict[str, Any] = Field(default_factory=dict)


class JobFailed(Event):
    durable: ClassVar[bool] = True
    reason: str
    caused_by: str | None = None
    """The dependency whose failure ended this job before it ran; None when it failed on its
    own (and in events written before this field existed)."""


class JobCancelled(Event):
    durable: ClassVar[bool] = True
    reason: str = "cancelled by request"
    caused_by: str | None = None
    """The dependency whose cancellation ended this job; None when it was asked to stop."""


class OutOfMemory(Event):
    memory_rung: int
    rung_name: str
    snapshot: dict[str, Any]
    message: str
    evicted: list[str] = Field(default_factory=list)
    """Other warm pipelines dropped to free memory; when any were, the retry keeps the rung."""


class RetryScheduled(Event):
    next_rung: int
    rung_name: str
    resume_from: dict[str, Any] | None = None


class JobPreempted(Event):
    by: str | None = None


class JobInterrupted(Event):
    """Its attempt is gone: found running when its own executor started again (the process
    died with it), or its lease expired (a dead or paused process, a lost box)."""

    previous_attempt: int


# Daemon -------------------------------------------------------------------------------------


class DaemonStarted(Event):
    pid: int
    host: str
    version: str
    device: str
    root: str
    executor: str | None = None
    """Its id as an executor (host/device), as its claims name it (None: older daemons)."""


class DaemonStopping(Event):
    reason: str


class DaemonStopped(Event):
    requeued: list[str] = Field(default_factory=list)


# The HTTP API and webhooks (streams ``api`` and ``webhooks``; no projection) ------------------


class ApiAuthFailed(Event):
    """A request to `dropkiln serve` without the right token (the token itself is never kept)."""

    client: str
    reason: str  # missing | malformed | wrong
    path: str


class WebhookAttemptFailed(Event):
    """One delivery attempt failed; another follows after ``retry_in_s`` unless ``last``."""

    for_seq: int
    job_id: str | None
    attempt: int
    error: str
    retry_in_s: float | None = None


class WebhookDelivered(Event):
    for_seq: int
    job_id: str | None
    attempt: int
    status: int


class WebhookGaveUp(Event):
    """Every attempt failed; the event is not sent again."""

    for_seq: int
    job_id: str | None
    attempts: int
    error: str


# Commands (written by the CLI or the TUI; the daemon obeys) ---------------------------------


class CancelRequested(Event):
    command: ClassVar[bool] = True
    by: str = "cli"


class RetryRequested(Event):
    command: ClassVar[bool] = True
    by: str = "cli"


class QueuePaused(Event):
    command: ClassVar[bool] = True
    by: str = "cli"


class QueueResumed(Event):
    command: ClassVar[bool] = True
    by: str = "cli"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type_name(): cls
    for cls in (
        Dropped,
        DropRejected,
        DropRecognised,
        DropMoved,
        DropMoveFailed,
        DropMoveAbandoned,
        DropWaiting,
        JobSubmitted,
        JobQueued,
        JobClaimed,
        JobStarted,
        JobProgress,
        CheckpointSaved,
        CheckpointUnusable,
        ArtifactWritten,
        JobSucceeded,
        JobFailed,
        JobCancelled,
        OutOfMemory,
        RetryScheduled,
        JobPreempted,
        JobInterrupted,
        DaemonStarted,
        DaemonStopping,
        DaemonStopped,
        CancelRequested,
        RetryRequested,
        QueuePaused,
        QueueResumed,
        ApiAuthFailed,
        WebhookAttemptFailed,
        WebhookDelivered,
        WebhookGaveUp,
    )
}


def parse_event(type_name: str, data: dict[str, Any]) -> Event:
    """The typed event for a stored row."""
    try:
        cls = EVENT_TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown event type {type_name!r}") from None
    return cls.model_validate(data)
