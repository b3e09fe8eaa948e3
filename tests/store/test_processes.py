"""Two processes on one real SQLite file: no "database is locked", gapless versions."""

from __future__ import annotations

import itertools
import multiprocessing
from pathlib import Path

import pytest

from dropkiln.store import EventStore
from dropkiln.store.events import job_stream
from dropkiln.store.sqlite import Connection

from .procs import SHARED, append_many

COUNT = 120


@pytest.mark.slow
async def test_two_processes_append_concurrently(db_path: Path) -> None:
    store = await EventStore.open(db_path, create=True)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    errors = context.Queue()
    workers = [
        context.Process(target=append_many, args=(str(db_path), name, COUNT, start, errors))
        for name in ("w1", "w2")
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        problems = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
        assert problems == []
        assert [w.exitcode for w in workers] == [0, 0]

        def by_stream(conn: Connection) -> dict[str, list[int]]:
            rows = conn.execute("SELECT stream, version FROM events ORDER BY seq")
            versions: dict[str, list[int]] = {}
            for stream, version in rows:
                versions.setdefault(stream, []).append(version)
            return versions

        versions = await store.snapshot(by_stream)
        batches = len(range(0, COUNT, 10))
        assert versions[SHARED] == list(range(1, 2 * (COUNT + batches) + 1))
        for name in ("w1", "w2"):
            assert versions[job_stream(name)] == list(range(1, COUNT + 1))
        # Both really ran at once: the shared stream interleaves their events.
        shared = await store.read(stream=SHARED, types=["JobProgress"], limit=None)
        writers = [e.data["metrics"]["by"] for e in shared]
        switches = sum(1 for a, b in itertools.pairwise(writers) if a != b)
        assert switches > 1
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        await store.close()
