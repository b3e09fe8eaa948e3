"""Quitting while store reads are in flight: every read ends, the store closes, and nothing
is left to call into the closed event loop (warnings are errors in this suite)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dropkiln.store import StoreError
from dropkiln.tui import DropkilnApp

from .conftest import wait_for
from .history import TRAIN

MakeApp = Callable[..., DropkilnApp]


async def test_quitting_mid_read_closes_the_store_cleanly(make_app: MakeApp) -> None:
    for _ in range(5):
        # Polls re-armed at once keep a read in flight nearly all the time.
        await quit_mid_read(make_app(poll_interval=0.001))


async def quit_mid_read(app: DropkilnApp) -> None:
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded)
        store = app.store
        app.open_job(TRAIN)
        await pilot.pause(0.02)
        # The status poll reads device memory and the heartbeat; quit while it runs.
        app.poll_status()
        await pilot.press("q")
    assert store is not None
    with pytest.raises(StoreError, match="closed"):
        await store.read(0)
