"""Commands to the daemon (cancel, retry, pause, resume): one event each, whoever asks.

The CLI, the dashboard and the HTTP API all append them here; the daemon tails and obeys.
`dropkiln cancel` must answer in a quarter of a second, and loading pydantic with the event
models takes about half of that: a command's data is only who asked, and its projection
reads nothing but its type, so it is written as a plain ``Command`` through the one write
path. The daemon reads it back as its typed event (``events.CancelRequested`` …); a test
holds the two to one shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from dropkiln.store.rows import Changes, job_update
from dropkiln.store.stored import DAEMON_STREAM, StoredEvent, job_stream

if TYPE_CHECKING:
    from dropkiln.store.eventstore import EventStore
    from dropkiln.store.queries import JobView

COMMANDS: dict[str, str] = {
    "cancel": "CancelRequested",
    "retry": "RetryRequested",
    "pause": "QueuePaused",
    "resume": "QueueResumed",
}
"""Each command and the type of the event that carries it."""
JOB_COMMANDS = frozenset({"cancel", "retry"})
# What a job command sets the job's ``requested`` column to; queue commands change no row.
_REQUESTED = {"CancelRequested": "cancel", "RetryRequested": "retry"}
_QUEUE = frozenset({"QueuePaused", "QueueResumed"})


@dataclass(frozen=True)
class Command:
    """A command event as ``EventStore.append`` takes it: what a typed event gives it."""

    type: str
    by: str
    durable: ClassVar[bool] = False

    def type_name(self) -> str:
        return self.type

    def model_dump(self, mode: str = "json") -> dict[str, Any]:
        return {"by": self.by}


def command_changes(stored: StoredEvent) -> Changes | None:
    """The projection changes of a command event; None for any other event."""
    requested = _REQUESTED.get(stored.type)
    if requested is not None:
        return job_update(stored, requested=requested)
    if stored.type in _QUEUE:
        return []
    return None


async def request_command(
    store: EventStore, command: str, job_ref: str | None = None, *, by: str
) -> JobView | None:
    """Append the command's event; returns the job it targets (found by id or prefix)."""
    from dropkiln.store.queries import find_job

    event = Command(COMMANDS[command], by)
    if command not in JOB_COMMANDS:
        await store.append(DAEMON_STREAM, [event])
        return None
    if job_ref is None:
        raise ValueError(f"{command} needs a job id")
    target = await find_job(store, job_ref)
    await store.append(job_stream(target.id), [event])
    return target
