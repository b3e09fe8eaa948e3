"""The overview screen against a store written by the real store code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dropkiln.store import EventStore, record_telemetry
from dropkiln.store.events import DAEMON_STREAM, DaemonStarted, JobProgress, job_stream
from dropkiln.tui import DropkilnApp
from dropkiln.tui.widgets import EventLog, JobsTable, MemoryPanel, NowRunning, StatusBar

from .conftest import loaded, log_lines, record_notifications, text_of, wait_for
from .history import (
    BUCKET,
    CACHE,
    GENERATE_FAILED,
    GENERATE_QUEUED,
    NOW,
    TRAIN,
    VIDEO,
    write_history,
)

NEWEST_FIRST = [VIDEO, GENERATE_QUEUED, TRAIN, CACHE, BUCKET, GENERATE_FAILED]
MakeApp = Callable[..., DropkilnApp]


async def test_jobs_are_listed_newest_first_with_their_state(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        table = app.screen.query_one(JobsTable)
        assert [row.key.value for row in table.ordered_rows] == NEWEST_FIRST
        states = {job: str(table.get_cell(job, "state")) for job in NEWEST_FIRST}
        assert states == {
            VIDEO: "waiting",
            GENERATE_QUEUED: "queued",
            TRAIN: "running",
            CACHE: "succeeded",
            BUCKET: "succeeded",
            GENERATE_FAILED: "failed",
        }
        assert str(table.get_cell(TRAIN, "progress")).endswith("30%")
        assert (table.get_cell(TRAIN, "att"), table.get_cell(TRAIN, "rung")) == ("2", "1")
        assert table.get_cell(TRAIN, "age") == "8m"


async def test_header_and_memory_say_daemon_up_on_a_cpu_box(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        status = text_of(app.screen.query_one(StatusBar))
        assert "● daemon up · seen 2s ago" in status
        assert "cpu" in status and "queue running" in status
        memory = app.screen.query_one(MemoryPanel)
        label = text_of(memory.query_one("#memory-label"))
        assert label == "RAM of the daemon — no GPU · rung 1 gradient_checkpointing (train cats)"
        assert "/ 24.0 GiB · peak 1.6 GiB" in text_of(memory.query_one("#memory-bar"))
        assert len(memory.query_one("#memory-sparkline").data or []) == 120


async def test_running_job_shows_step_speed_eta_and_loss(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        now_running = text_of(app.screen.query_one(NowRunning))
        assert now_running == "▶ train cats 600/2000 · 3.2 it/s · ETA 7m18s · loss 0.1880"
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        table = app.screen.query_one(JobsTable)
        row = [table.get_cell(TRAIN, c) for c in ("step", "it/s", "ETA", "loss")]
        assert row == ["600/2000", "3.2", "7m18s", "0.1880"]
        assert not app.screen.query_one(NowRunning).display


async def test_event_log_tails_the_last_window(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        lines = log_lines(app.screen.query_one(EventLog))
        assert lines[0].startswith("12:00:00 daemon") and "DaemonStarted pid 4242" in lines[0]
        assert lines[-1] == "12:10:00 job:t7a9b3f2  JobProgress 600/2000 loss 0.188 it/s 3.2"
        assert sum("OutOfMemory" in line for line in lines) == 3


async def test_appended_events_show_up_live(make_app: MakeApp, history_db: Path) -> None:
    app = make_app(poll_interval=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        table = app.screen.query_one(JobsTable)
        async with await EventStore.open(history_db) as writer:
            metrics = {"loss": 0.1234, "it_s": 3.3, "eta_s": 400.0}
            await writer.append(
                job_stream(TRAIN), [JobProgress(done=625, total=2000, metrics=metrics)]
            )
        await wait_for(pilot, lambda: "625/2000" in text_of(app.screen.query_one(NowRunning)))
        assert str(table.get_cell(TRAIN, "progress")).endswith("31%")
        log = log_lines(app.screen.query_one(EventLog))
        assert log[-1].endswith("JobProgress 625/2000 loss 0.1234 it/s 3.3")


async def test_daemon_down_shows_last_state_and_notices_its_return(
    make_app: MakeApp, history_db: Path
) -> None:
    later = NOW + 600
    app = make_app(now=later)
    async with app.run_test(size=(80, 24)) as pilot:
        notes = record_notifications(app)
        await loaded(pilot)
        status = text_of(app.screen.query_one(StatusBar))
        assert "○ daemon not running · last seen 10m ago" in status
        assert len(app.screen.query_one(JobsTable).ordered_rows) == 6
        async with await EventStore.open(history_db) as daemon:
            started = DaemonStarted(pid=5151, host="kiln", version="0.1.0", device="cpu", root="/")
            # As a daemon does: started first, then its heartbeat (the other order lets a
            # poll between the two see the old DaemonStarted with a fresh heartbeat).
            await daemon.append(DAEMON_STREAM, [started])
            await record_telemetry(daemon, {"at": later - 0.5, "device": "cpu"}, 3600)
        await wait_for(pilot, lambda: "daemon up" in text_of(app.screen.query_one(StatusBar)))
        assert "The daemon is back (pid 5151)." in notes


async def test_missing_database_says_how_to_create_one(tmp_path: Path) -> None:
    db = tmp_path / "home" / "state" / "dropkiln.db"
    app = DropkilnApp(db, clock=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.problem is not None)
        notice = text_of(app.screen.query_one("#problem"))
        assert f"No dropkiln database at {db}" in notice
        assert f"dropkiln init {tmp_path / 'home'}" in notice and "dropkiln daemon" in notice
        assert "no database" in text_of(app.screen.query_one(StatusBar))
        db.parent.mkdir(parents=True)
        await write_history(db)
        await loaded(pilot)
        assert not app.screen.query_one("#problem").display
        assert len(app.screen.query_one(JobsTable).ordered_rows) == 6
