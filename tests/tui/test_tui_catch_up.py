"""A burst of more events than one poll reads: the dashboard reads on at once until it has
them all (and does not stop after the first batch)."""

from __future__ import annotations

import time
from pathlib import Path

from dropkiln.store import EventStore
from dropkiln.store.events import JobProgress
from dropkiln.tui import DropkilnApp
from dropkiln.tui.app import POLL_BATCH

from .conftest import wait_for


async def test_a_burst_of_several_batches_is_read_to_its_end(history_db: Path) -> None:
    app = DropkilnApp(history_db, poll_interval=0.05, clock=time.time)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.loaded)
        store = await EventStore.open(history_db)
        try:
            await store.append_batch(
                [("job:burst", [JobProgress(done=n, total=0) for n in range(3 * POLL_BATCH)])]
            )
            last = await store.last_seq()
        finally:
            await store.close()
        await wait_for(pilot, lambda: app.events_read == last, timeout=20)
