"""Tail: every event in order, woken by local appends and by other processes' commits."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from dropkiln.bench.store import tail_latency
from dropkiln.store import EventStore, StoredEvent
from dropkiln.store import events as ev
from dropkiln.store.events import DAEMON_STREAM, job_stream
from dropkiln.store.eventstore import TAIL_BATCH

from .builders import submitted


async def take(tail: AsyncIterator[StoredEvent], count: int, into: list[StoredEvent]) -> None:
    while len(into) < count:
        into.append(await anext(tail))


async def test_tail_yields_the_backlog_in_order_then_new_events(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])
    got: list[StoredEvent] = []
    tail = store.tail(after=1)
    try:
        with anyio.fail_after(5):
            await take(tail, 2, got)
            assert [e.seq for e in got] == [2, 3]
            async with anyio.create_task_group() as group:
                group.start_soon(take, tail, 5, got)
                await store.append(job_stream("b"), [submitted("b")])
                await store.append(job_stream("a"), [ev.CancelRequested(), ev.JobCancelled()])
    finally:
        await tail.aclose()
    assert [e.seq for e in got] == [2, 3, 4, 5, 6]
    assert got == await store.read(1)


async def test_a_local_append_wakes_the_tail_without_polling(store: EventStore) -> None:
    got: list[StoredEvent] = []
    # A poll interval far longer than the timeout: only the local wake-up can deliver.
    tail = store.tail(poll_interval=60)
    try:
        with anyio.fail_after(2):
            async with anyio.create_task_group() as group:
                group.start_soon(take, tail, 1, got)
                await anyio.sleep(0.2)  # the tail is idle, waiting
                await store.append(DAEMON_STREAM, [ev.QueuePaused()])
    finally:
        await tail.aclose()
    assert [e.type for e in got] == ["QueuePaused"]


@pytest.mark.slow
async def test_a_commit_in_another_process_wakes_the_tail(db_path: Path) -> None:
    # The benchmark's measurement: the writer is another process and this one never
    # appends, so only the watch on the database's files can wake the tail.
    count = 12
    figures = await tail_latency(db_path, count)
    ordered = sorted(figures["tail_latency_s"])
    assert len(ordered) == count
    print(
        f"cross-process tail latency: p50 {statistics.median(ordered) * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms"
    )
    assert ordered[-1] < 2.0


async def test_filtered_tails_miss_nothing(store: EventStore) -> None:
    wanted_types = ("JobQueued", "CancelRequested")
    by_stream: list[StoredEvent] = []
    by_type: list[StoredEvent] = []
    stream_tail = store.tail(stream=job_stream("a"))
    type_tail = store.tail(types=wanted_types)

    # One batch larger than a tail read, then many small ones across streams.
    plan: list[tuple[str, list[ev.Event]]] = [
        (job_stream("noise"), [ev.JobProgress(done=i, total=1) for i in range(TAIL_BATCH + 37)])
    ]
    for i in range(60):
        plan.append((job_stream("a"), [ev.JobProgress(done=i, total=60), ev.JobQueued()]))
        plan.append((job_stream("b"), [ev.CancelRequested()] if i % 7 == 0 else [ev.JobQueued()]))
        plan.append((DAEMON_STREAM, [ev.QueuePaused()]))
    plan.append((job_stream("noise"), [ev.JobProgress(done=0, total=1)] * (TAIL_BATCH * 2 + 3)))
    plan.append((job_stream("a"), [ev.CancelRequested()]))
    want_stream = sum(len(new) for stream, new in plan if stream == job_stream("a"))
    want_type = sum(1 for _, new in plan for e in new if e.type_name() in wanted_types)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(take, stream_tail, want_stream, by_stream)
                group.start_soon(take, type_tail, want_type, by_type)
                for stream, new in plan:
                    await store.append(stream, new)
                    if len(new) < 5:
                        await anyio.sleep(0)  # let the tails interleave with the writes
    finally:
        await stream_tail.aclose()
        await type_tail.aclose()
    assert by_stream == await store.read(stream=job_stream("a"), limit=None)
    assert by_type == await store.read(types=wanted_types, limit=None)


async def test_an_idle_tail_without_inotify_wakes_neither_the_loop_nor_its_thread_on_a_fast_clock(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 16: a tail on the SQLite store (the daemon's default) with nothing to read waits
    # in one worker thread; the event loop is woken for a commit only (not at each fallback
    # look). Where there is no inotify (not Linux) the thread's watchfiles steps come at most
    # 25 times a second (each one takes the GIL). (PostgreSQL's tail sleeps on LISTEN and
    # looks every poll_interval.)
    import anyio.to_thread
    import watchfiles._rust_notify

    from dropkiln.store import commitwatch

    def no_inotify(*args: object) -> None:
        raise OSError("inotify instances exhausted")

    monkeypatch.setattr(commitwatch, "KernelNotices", no_inotify)

    real_notify = watchfiles._rust_notify.RustNotify
    steps = [0]

    class CountingNotify:
        def __init__(self, *args: object) -> None:
            self._real = real_notify(*args)  # type: ignore[arg-type]

        def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int, stop: object) -> object:
            class Counting:
                def is_set(self) -> bool:
                    steps[0] += 1
                    return bool(stop is not None and stop.is_set())  # type: ignore[attr-defined]

            return self._real.watch(debounce_ms, step_ms, timeout_ms, Counting())

        def close(self) -> None:
            self._real.close()

    hops = [0]
    real_run_sync = anyio.to_thread.run_sync

    async def counting_run_sync(*args: object, **kwargs: object) -> object:
        hops[0] += 1
        return await real_run_sync(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(watchfiles._rust_notify, "RustNotify", CountingNotify)
    store = await EventStore.open(db_path, create=True)
    tail = store.tail(poll_interval=0.1)  # the fallback looks 20 times in the window
    got: list[StoredEvent] = []
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(take, tail, 1, got)
            await anyio.sleep(0.3)  # opened, read the (empty) log, waiting
            monkeypatch.setattr(anyio.to_thread, "run_sync", counting_run_sync)
            steps[0] = 0
            await anyio.sleep(2.0)
            idle_hops, idle_steps = hops[0], steps[0]
            monkeypatch.setattr(anyio.to_thread, "run_sync", real_run_sync)
            with anyio.fail_after(2):
                await store.append(DAEMON_STREAM, [ev.QueuePaused()])
                while not got:
                    await anyio.sleep(0.01)
    finally:
        await tail.aclose()
        await store.close()
    assert idle_hops == 0
    assert 0 < idle_steps <= 55
    assert [e.type for e in got] == ["QueuePaused"]


def thread_wakes() -> dict[int, int]:
    """How often each thread of this process but the main one went to sleep and was woken
    (the kernel's count of voluntary context switches)."""
    main = threading.main_thread().native_id
    wakes: dict[int, int] = {}
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == main:
            continue
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    wakes[int(task.name)] = int(line.split()[1])
    return wakes


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts wakes in /proc")
async def test_an_idle_tail_thread_does_not_run_between_commits(db_path: Path) -> None:
    # Issue 16: watchfiles' 40 ms step woke the tail's thread 25 times a second, taking the
    # GIL each time (0.27% of a core in an idle daemon). On Linux the thread sleeps on the
    # kernel's notice of a write, so with nothing committed it is not woken at all, and a
    # commit still reaches the tail at once.
    store = await EventStore.open(db_path, create=True)
    tail = store.tail(poll_interval=60)  # no fallback look within the test
    got: list[StoredEvent] = []
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(take, tail, 1, got)
            await anyio.sleep(0.3)  # opened, read the (empty) log, waiting
            before = thread_wakes()
            await anyio.sleep(2.0)
            after = thread_wakes()
            with anyio.fail_after(2):
                await store.append(DAEMON_STREAM, [ev.QueuePaused()])
                appended = time.monotonic()
                while not got:
                    await anyio.sleep(0.005)
                reaction = time.monotonic() - appended
    finally:
        await tail.aclose()
        await store.close()
    woken = {tid: after[tid] - before.get(tid, 0) for tid in after}
    assert sum(woken.values()) <= 2, woken
    assert [e.type for e in got] == ["QueuePaused"]
    print(f"an idle tail saw a commit after {reaction * 1000:.1f} ms")
    assert reaction < 1.0  # a generous bound for a busy machine; the bench times it


async def test_a_commit_that_appends_no_event_leaves_the_tails_loop_asleep(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 16: every commit woke each tail's event loop (three thread hops: the version,
    # an empty read, the next wait), also the telemetry sample an idle daemon writes every
    # 2.5 s and each lease renewal, which append no event. Now the tail's thread tells
    # them apart and only new events reach the loop.
    import sqlite3

    import anyio.to_thread

    hops = [0]
    real_run_sync = anyio.to_thread.run_sync

    async def counting_run_sync(*args: object, **kwargs: object) -> object:
        hops[0] += 1
        return await real_run_sync(*args, **kwargs)  # type: ignore[arg-type]

    store = await EventStore.open(db_path, create=True)
    tail = store.tail(poll_interval=60)
    got: list[StoredEvent] = []
    # Another writer, as another process would be: a row in a table that is not the log.
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(take, tail, 1, got)
            await anyio.sleep(0.3)  # opened, read the (empty) log, waiting
            monkeypatch.setattr(anyio.to_thread, "run_sync", counting_run_sync)
            for sample in range(5):
                other.execute(
                    "INSERT INTO telemetry (at, device) VALUES (?, 'cpu')", (float(sample),)
                )
                await anyio.sleep(0.2)
            quiet_hops = hops[0]
            monkeypatch.setattr(anyio.to_thread, "run_sync", real_run_sync)
            with anyio.fail_after(2):
                await store.append(DAEMON_STREAM, [ev.QueuePaused()])
                while not got:
                    await anyio.sleep(0.01)
    finally:
        other.close()
        await tail.aclose()
        await store.close()
    assert quiet_hops == 0
    assert [e.type for e in got] == ["QueuePaused"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
async def test_tails_cancelled_while_waiting_leave_no_thread_or_descriptor_behind(
    db_path: Path,
) -> None:
    # A tail's wait runs in a worker thread that a cancel abandons: the cancel interrupts
    # it at once, and the thread closes the watch's descriptors as it leaves.
    store = await EventStore.open(db_path, create=True)
    try:
        await store.append(DAEMON_STREAM, [ev.QueuePaused()])
        for round_ in range(21):
            if round_ == 1:  # the store's read connections are open now
                descriptors = len(list(Path("/proc/self/fd").iterdir()))
                threads = threading.active_count()
            tail = store.tail(after=1, poll_interval=60)
            with anyio.move_on_after(0.05):
                await anext(tail)  # nothing after seq 1: it waits, and is cancelled
            await tail.aclose()
        with anyio.fail_after(5):
            while len(list(Path("/proc/self/fd").iterdir())) > descriptors:
                await anyio.sleep(0.05)
        busy = [t for t in threading.enumerate() if "commitwatch" in repr(t)]
        assert threading.active_count() <= threads + 2, busy
    finally:
        await store.close()
