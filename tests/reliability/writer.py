"""Append events as fast as one process can, one transaction each: the worst a second
writer can do to the daemon. ``python -m tests.reliability.writer DB SECONDS`` prints
how many it appended."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio

from dropkiln.store import EventStore
from dropkiln.store.events import JobProgress

STREAMS = 7


async def append_for(db: Path, seconds: float) -> int:
    store = await EventStore.open(db)
    appended = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            # Streams of no job: no projection row changes, no work for the daemon, no
            # history `store check` would call a job's, but every reader sees them.
            stream = f"load:{appended % STREAMS}"
            await store.append(stream, [JobProgress(done=appended, total=0)])
            appended += 1
    finally:
        await store.close()
    return appended


if __name__ == "__main__":
    print(anyio.run(append_for, Path(sys.argv[1]), float(sys.argv[2])))
