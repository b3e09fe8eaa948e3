"""Power loss: a commit that an irreversible step follows must be on disk when it returns.

In WAL mode with synchronous=NORMAL, SQLite's documentation says a commit may be rolled
back by a power cut (the WAL is fsynced only at checkpoints); with FULL the WAL is fsynced
at every commit. So the statements the write connection runs around such a commit are
the observable part of the promise."""

from __future__ import annotations

from dropkiln.store import EventStore
from dropkiln.store import events as ev
from dropkiln.store.events import DAEMON_STREAM, drop_stream, job_stream

from .builders import submitted

DROPPED = ev.Dropped(
    drop_id="d1",
    kind="dataset",
    name="cats",
    source="drop/datasets/cats",
    stored="drop/processed/d1-cats",
    hash="h",
    files=1,
    bytes=1,
)


async def traced(store: EventStore, stream: str, new: list[ev.Event]) -> list[str]:
    statements: list[str] = []
    assert store.database._write_connection is not None
    store.database._write_connection.set_trace_callback(statements.append)
    try:
        await store.append(stream, new)
    finally:
        store.database._write_connection.set_trace_callback(None)
    return [s for s in statements if s.split()[0] in ("PRAGMA", "BEGIN", "COMMIT")]


async def test_defect17_commits_before_irreversible_steps_are_durable(
    sqlite_store: EventStore,
) -> None:
    store = sqlite_store
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])  # opens the write connection
    full = [
        "PRAGMA synchronous = FULL",
        "BEGIN IMMEDIATE",
        "COMMIT",
        "PRAGMA synchronous = NORMAL",
    ]
    # Ingest: committed, then the drop is renamed out of the drop folder.
    assert await traced(store, drop_stream("d1"), [DROPPED]) == full
    await store.append(job_stream("j"), [submitted("j"), ev.JobStarted(attempt=1, memory_rung=0)])
    # A checkpoint: committed, then older checkpoints are pruned.
    checkpoint = ev.CheckpointSaved(state={"step": 2})
    assert await traced(store, job_stream("j"), [checkpoint]) == full
    # An ending: committed, then the next job reads (and may replace) the outputs.
    assert await traced(store, job_stream("j"), [ev.JobSucceeded()]) == full
    # Progress is most of the log and nothing irreversible follows it: no fsync.
    progress = ev.JobProgress(done=1, total=2)
    statements = await traced(store, job_stream("k"), [submitted("k"), progress])
    assert statements == ["BEGIN IMMEDIATE", "COMMIT"]
