"""Appending and reading events: versions, optimistic concurrency, all-or-nothing batches."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from dropkiln.store import ConcurrencyError, EventStore, StoreError
from dropkiln.store import events as ev
from dropkiln.store.backend import open_store
from dropkiln.store.events import DAEMON_STREAM, job_stream
from dropkiln.store.schema import PROJECTIONS, events
from dropkiln.store.sqlite import Connection

from .builders import submitted


async def everything(store: EventStore) -> dict[str, Any]:
    """Every row of the log and the projections, to show that nothing changed."""

    def work(conn: Connection) -> dict[str, Any]:
        tables = (events, *PROJECTIONS)
        return {t.name: [tuple(r) for r in conn.execute(f"SELECT * FROM {t.name}")] for t in tables}

    return await store.snapshot(work)


async def version_of(store: EventStore, stream: str) -> int:
    """The stream's version as a reader sees it (0 for a stream without events)."""
    last = await store.last(stream)
    return last[0].version if last else 0


async def test_append_assigns_global_seq_and_per_stream_versions(store: EventStore) -> None:
    a = await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    b = await store.append(job_stream("b"), [submitted("b")])
    a2 = await store.append(job_stream("a"), [ev.JobStarted(attempt=1, memory_rung=0)])
    assert [e.seq for e in a + b + a2] == [1, 2, 3, 4]
    assert [(e.stream, e.version) for e in a + b + a2] == [
        ("job:a", 1),
        ("job:a", 2),
        ("job:b", 1),
        ("job:a", 3),
    ]
    assert await version_of(store, "job:a") == 3
    assert await version_of(store, "job:missing") == 0
    assert await store.last_seq() == 4


async def test_read_returns_what_was_appended(store: EventStore) -> None:
    event = ev.JobProgress(done=1, total=2, metrics={"loss": 0.5, "note": "ünïcode ✓"})
    appended = await store.append(job_stream("a"), [submitted("a"), event])
    assert await store.read() == appended
    assert appended[1].data == event.model_dump(mode="json")
    assert ev.parse_event(appended[1].type, appended[1].data) == event


async def test_read_filters(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])
    await store.append(job_stream("b"), [submitted("b"), ev.JobQueued()])
    assert [e.seq for e in await store.read(2)] == [3, 4, 5]
    assert [e.seq for e in await store.read(stream="job:b")] == [4, 5]
    assert [e.seq for e in await store.read(types=["JobQueued", "QueuePaused"])] == [2, 3, 5]
    assert [e.seq for e in await store.read(1, limit=2)] == [2, 3]
    assert [e.seq for e in await store.read(2, stream="job:a", types=["JobQueued"])] == []


async def test_last_is_newest_first(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    await store.append(DAEMON_STREAM, [ev.QueuePaused(), ev.QueueResumed()])
    await store.append(job_stream("a"), [ev.JobStarted(attempt=1, memory_rung=0)])
    assert [e.seq for e in await store.last()] == [5]
    assert [e.seq for e in await store.last(limit=3)] == [5, 4, 3]
    assert [e.seq for e in await store.last("job:a", limit=10)] == [5, 2, 1]
    assert [e.type for e in await store.last(types=["QueuePaused", "JobQueued"], limit=5)] == [
        "QueuePaused",
        "JobQueued",
    ]
    assert [e.seq for e in await store.last(DAEMON_STREAM, types=["QueuePaused"])] == [3]
    assert await store.last("job:nobody") == []


async def test_expected_version_accepts_the_current_version(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a")], expected_version=0)
    stored = await store.append(job_stream("a"), [ev.JobQueued()], expected_version=1)
    assert stored[0].version == 2


async def test_stale_expected_version_raises_and_writes_nothing(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    before = await everything(store)
    with pytest.raises(ConcurrencyError) as caught:
        await store.append(
            job_stream("a"), [ev.JobStarted(attempt=1, memory_rung=0)], expected_version=1
        )
    message = str(caught.value)
    assert "job:a" in message
    assert "version 2" in message
    assert "expected 1" in message
    assert "nothing was written" in message
    assert isinstance(caught.value, StoreError)
    assert await everything(store) == before


async def test_expected_version_zero_means_a_new_stream(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a")])
    with pytest.raises(ConcurrencyError, match="expected 0"):
        await store.append(job_stream("a"), [submitted("a")], expected_version=0)


@pytest.mark.parametrize("stale", ["job:a", "job:b"])
async def test_a_stale_stream_rolls_back_the_whole_batch(store: EventStore, stale: str) -> None:
    await store.append(job_stream("a"), [submitted("a")])
    await store.append(job_stream("b"), [submitted("b")])
    before = await everything(store)
    expected: dict[str, int | None] = {"job:a": 1, "job:b": 1, stale: 0}
    batch: list[tuple[str, list[ev.Event]]] = [
        (job_stream("a"), [ev.JobQueued(), ev.JobStarted(attempt=1, memory_rung=0)]),
        (job_stream("b"), [ev.JobQueued()]),
    ]
    with pytest.raises(ConcurrencyError, match=stale):
        await store.append_batch(batch, expected)
    assert await everything(store) == before
    # The store is still usable and versions continue without a gap.
    stored = await store.append_batch(batch, {"job:a": 1, "job:b": 1})
    assert [(e.stream, e.version) for e in stored] == [("job:a", 2), ("job:a", 3), ("job:b", 2)]


async def test_batch_without_expectations_appends_everywhere(store: EventStore) -> None:
    stored = await store.append_batch(
        [(job_stream("a"), [submitted("a")]), (job_stream("b"), [submitted("b")])]
    )
    assert [(e.seq, e.stream, e.version) for e in stored] == [(1, "job:a", 1), (2, "job:b", 1)]


async def test_a_writer_with_a_stale_view_loses(
    store: EventStore, db_path: Path, store_url: str
) -> None:
    other = await open_store(db_path, store_url)
    try:
        await store.append(job_stream("a"), [submitted("a")])
        seen = await version_of(other, "job:a")
        await store.append(job_stream("a"), [ev.CancelRequested()], expected_version=seen)
        with pytest.raises(ConcurrencyError):
            await other.append(job_stream("a"), [ev.JobQueued()], expected_version=seen)
        assert [e.type for e in await other.read()] == ["JobSubmitted", "CancelRequested"]
    finally:
        await other.close()


async def test_an_event_contradicting_the_projections_writes_nothing(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a")])
    before = await everything(store)
    # A second JobSubmitted for job "a" (in another stream) cannot be a new jobs row.
    with pytest.raises(StoreError, match="JobSubmitted on job:b") as caught:
        await store.append_batch(
            [(job_stream("c"), [submitted("c")]), (job_stream("b"), [submitted("a")])]
        )
    assert not isinstance(caught.value, ConcurrencyError)
    assert await everything(store) == before


async def test_concurrent_appends_in_one_process_get_distinct_versions(store: EventStore) -> None:
    async def writer(n: int) -> None:
        for _ in range(n):
            await store.append(DAEMON_STREAM, [ev.QueuePaused()])

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(writer, 25)

    def versions(conn: Connection) -> list[int]:
        query = "SELECT version FROM events WHERE stream = :stream"
        return sorted(row[0] for row in conn.execute(query, {"stream": DAEMON_STREAM}))

    assert await store.snapshot(versions) == list(range(1, 101))
    count = await store.snapshot(
        lambda conn: conn.execute("SELECT count(*) FROM events").fetchone()[0]
    )
    assert count == 100


async def test_close_waits_for_a_read_whose_caller_went_away(store: EventStore) -> None:
    """A dashboard quitting cancels its workers mid-read (asyncio cancellation leaves the
    worker thread running): closing must wait for that read, not close its connection
    under it, and refuse what is asked afterwards."""
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])
    started, release = threading.Event(), threading.Event()
    counted: list[int] = []

    def slow(conn: Connection) -> None:
        started.set()
        release.wait(30)
        counted.append(conn.execute("SELECT count(*) FROM events").fetchone()[0])

    reading = asyncio.ensure_future(store.snapshot(slow))
    await anyio.to_thread.run_sync(started.wait)
    reading.cancel()
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0.3)
    assert not closing.done()  # the read still runs in its thread
    release.set()
    await closing
    assert counted == [1]
    with pytest.raises(StoreError, match="closed"):
        await store.read()
