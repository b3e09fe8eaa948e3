"""Work done in other processes (multiprocessing, spawn) against a shared database file."""

from __future__ import annotations

import asyncio
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from dropkiln.store import EventStore, list_jobs
from dropkiln.store import events as ev
from dropkiln.store.events import job_stream

SHARED = job_stream("shared")


async def _append_many(path: Path, worker: str, count: int, start: Barrier) -> None:
    store = await EventStore.open(path)
    try:
        # Import and warm everything an append and a read load on first use (the store loads
        # its modules lazily), so that both workers are appending when the barrier opens;
        # otherwise the first can finish before the second has imported the projections.
        await store.append(job_stream(f"{worker}-warm-up"), [ev.JobProgress(done=0, total=1)])
        await list_jobs(store)
        await asyncio.to_thread(start.wait)
        own = job_stream(worker)
        for i in range(count):
            await store.append(
                SHARED, [ev.JobProgress(done=i, total=count, metrics={"by": worker})]
            )
            await store.append(own, [ev.JobProgress(done=i, total=count)])
            if i % 10 == 0:
                await store.append_batch([(SHARED, [ev.CancelRequested(by=worker)]), (own, [])])
            if i % 5 == 0:
                await list_jobs(store)
                await store.read(stream=SHARED, limit=50)
    finally:
        await store.close()


def append_many(path: str, worker: str, count: int, start: Barrier, errors: Any) -> None:
    """Once every worker is ready, append to a shared and an own stream, reading between."""
    try:
        asyncio.run(_append_many(Path(path), worker, count, start))
    except BaseException as exc:
        errors.put(f"{worker}: {exc!r}")
        raise
