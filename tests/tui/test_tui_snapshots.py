"""Snapshots of the overview and of a job, at 80×24 and 120×40 (frozen clock, fixed zone)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from dropkiln.tui import DropkilnApp
from dropkiln.tui.screens import JobScreen
from dropkiln.tui.widgets import JobsTable

from .conftest import loaded, wait_for
from .history import TRAIN

SIZES = [(80, 24), (120, 40)]


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_overview(snap_compare: Any, make_app: Callable[..., DropkilnApp], size: tuple[int, int]):
    assert snap_compare(make_app(), terminal_size=size, run_before=loaded)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_training_job(
    snap_compare: Any, make_app: Callable[..., DropkilnApp], size: tuple[int, int]
) -> None:
    async def open_training_job(pilot: Pilot[None]) -> None:
        await loaded(pilot)
        table = pilot.app.screen.query_one(JobsTable)
        table.move_cursor(row=table.get_row_index(TRAIN))
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, JobScreen))
        await wait_for(pilot, lambda: pilot.app.screen.query_one("#job-events").lines)  # type: ignore[attr-defined]

    assert snap_compare(make_app(), terminal_size=size, run_before=open_training_job)
