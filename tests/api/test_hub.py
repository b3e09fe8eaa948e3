"""The event hub: one tail for every stream client; a slow client catches up from the store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from dropkiln.api.errors import ApiError
from dropkiln.api.hub import EventHub
from dropkiln.store import EventStore, StoredEvent
from dropkiln.store.events import JobProgress, JobQueued, job_stream


async def test_a_slow_subscriber_misses_nothing_and_its_buffer_stays_small(tmp_path: Path) -> None:
    async with await EventStore.open(tmp_path / "db", create=True) as store:
        hub = EventHub(store, buffer=2, max_subscribers=3, poll_interval=0.01)
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run)
            await hub.ready.wait()
            slow, fast = hub.events(0, None, 0.5), hub.events(0, job_stream("a"), 0.5)
            got_slow: list[StoredEvent] = []
            got_fast: list[StoredEvent] = []

            async def read(
                source: AsyncIterator[StoredEvent | None],
                into: list[StoredEvent],
                count: int,
                pause: float,
            ) -> None:
                async for event in source:
                    if event is not None:
                        into.append(event)
                        await anyio.sleep(pause)
                    if len(into) == count:
                        return

            async with anyio.create_task_group() as readers:
                readers.start_soon(read, slow, got_slow, 60, 0.01)
                readers.start_soon(read, fast, got_fast, 30, 0)
                await anyio.sleep(0.1)
                for i in range(30):
                    await store.append(job_stream("a"), [JobProgress(done=i, total=30)])
                    await store.append(job_stream("b"), [JobQueued()])
            tg.cancel_scope.cancel()
    assert [e.seq for e in got_slow] == list(range(1, 61))
    assert [e.seq for e in got_fast] == list(range(1, 61, 2))
    assert {e.stream for e in got_fast} == {"job:a"}


async def test_streams_over_the_limit_are_refused_before_they_start(tmp_path: Path) -> None:
    async with await EventStore.open(tmp_path / "db", create=True) as store:
        hub = EventHub(store, buffer=4, max_subscribers=1, poll_interval=0.01)
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run)
            first = hub.events(0, None, 0.05)
            assert await anext(first) is None  # registered, nothing to send yet
            with pytest.raises(ApiError) as refused:
                hub.events(0, None)
            assert refused.value.code == "too_many_streams"
            await first.aclose()  # type: ignore[attr-defined]
            assert hub.subscribers == 0
            hub.events(0, None)
            tg.cancel_scope.cancel()
