"""Commands to the daemon (cancel, retry, pause, resume): one event each, whoever asks.

The CLI, the dashboard and the HTTP API all append them here; the daemon tails and obeys.
"""

from __future__ import annotations

from dropkiln.store.events import (
    DAEMON_STREAM,
    CancelRequested,
    Event,
    QueuePaused,
    QueueResumed,
    RetryRequested,
    job_stream,
)
from dropkiln.store.eventstore import EventStore
from dropkiln.store.queries import JobView, find_job

COMMANDS: dict[str, type[Event]] = {
    "cancel": CancelRequested,
    "retry": RetryRequested,
    "pause": QueuePaused,
    "resume": QueueResumed,
}
JOB_COMMANDS = frozenset({"cancel", "retry"})


async def request_command(
    store: EventStore, command: str, job_ref: str | None = None, *, by: str
) -> JobView | None:
    """Append the command's event; returns the job it targets (found by id or prefix)."""
    event = COMMANDS[command](by=by)  # type: ignore[call-arg]
    if command not in JOB_COMMANDS:
        await store.append(DAEMON_STREAM, [event])
        return None
    if job_ref is None:
        raise ValueError(f"{command} needs a job id")
    target = await find_job(store, job_ref)
    await store.append(job_stream(target.id), [event])
    return target
