"""The dashboard attached to a real daemon: a dropped dataset's jobs appear, progress and
finish on screen, and a cancel sent from the dashboard stops the running training job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dropkiln.tui import DropkilnApp
from dropkiln.tui.dialogs import ConfirmScreen
from dropkiln.tui.widgets import EventLog, JobsTable, MemoryPanel, StatusBar
from tests.integration.daemon_process import DaemonProcess
from tests.samples import write_dataset

from .conftest import log_lines, text_of, wait_for

pytestmark = pytest.mark.slow

LONG_TRAINING = "steps = 100000\ncheckpoint_every = 1000\n"


def _job(app: DropkilnApp, stage: str):  # type: ignore[no-untyped-def]
    return next((job for job in app.jobs if job.stage == stage), None)


def _state(app: DropkilnApp, stage: str) -> str | None:
    job = _job(app, stage)
    return job.state if job else None


async def test_dropped_dataset_runs_on_screen_and_cancel_stops_training(tmp_path: Path) -> None:
    root = tmp_path / "home"
    daemon = DaemonProcess(root)
    app = DropkilnApp(root / "state" / "dropkiln.db", poll_interval=0.05, clock=time.time)
    async with app.run_test(size=(120, 40)) as pilot:
        # Before the daemon has made its database, the dashboard says how to make one.
        await wait_for(pilot, lambda: app.problem is not None)
        assert "dropkiln init" in text_of(app.screen.query_one("#problem"))
        daemon.start()
        try:
            daemon.wait_serving()
            staging = write_dataset(tmp_path / "staging" / "cats", count=4, size=64,
                                    toml=LONG_TRAINING)  # fmt: skip
            staging.rename(root / "drop" / "datasets" / "cats")
            await wait_for(pilot, lambda: app.loaded and _state(app, "bucket"), timeout=30)
            table = app.screen.query_one(JobsTable)
            assert {row.key.value for row in table.ordered_rows} >= {j.id for j in app.jobs}
            await wait_for(pilot, lambda: _state(app, "bucket") == "succeeded", timeout=60)
            await wait_for(pilot, lambda: _state(app, "cache") == "succeeded", timeout=120)
            await wait_for(
                pilot,
                lambda: _state(app, "train") == "running" and (_job(app, "train").done or 0) > 0,
                timeout=120,
            )
            train = _job(app, "train")
            assert "daemon up" in text_of(app.screen.query_one(StatusBar))
            memory = text_of(app.screen.query_one(MemoryPanel).query_one("#memory-label"))
            assert memory.startswith("RAM of the daemon — no GPU")
            assert str(table.get_cell(train.id, "step")).endswith("/100000")
            log = log_lines(app.screen.query_one(EventLog))
            assert any(f"job:{train.id[:8]}" in line and "JobProgress" in line for line in log)

            table.move_cursor(row=table.get_row_index(train.id))
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await wait_for(pilot, lambda: _state(app, "train") == "cancelled", timeout=60)
            assert str(table.get_cell(train.id, "state")) == "cancelled"
            # The jobs table and the log refresh in separate steps of a poll: the log line
            # may land one poll after the row.
            await wait_for(
                pilot,
                lambda: any(
                    "JobCancelled" in line for line in log_lines(app.screen.query_one(EventLog))
                ),
                timeout=10,
            )
            log = log_lines(app.screen.query_one(EventLog))
            assert any("CancelRequested by tui" in line for line in log)
            assert any("JobCancelled" in line for line in log)
        finally:
            if daemon.alive():
                daemon.terminate()
        await wait_for(pilot, lambda: "daemon not running" in text_of(
            app.screen.query_one(StatusBar)), timeout=15)  # fmt: skip
