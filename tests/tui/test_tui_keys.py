"""Every key: commands land in the log as command events, destructive ones after a yes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import Input

from dropkiln.store import EventStore, StoredEvent
from dropkiln.store.events import DAEMON_STREAM, job_stream
from dropkiln.tui import DropkilnApp
from dropkiln.tui.dialogs import ConfirmScreen, FilterScreen, HelpScreen
from dropkiln.tui.screens import JobScreen, MainScreen
from dropkiln.tui.widgets import EventLog, JobsTable, StatusBar

from .conftest import loaded, log_lines, record_notifications, text_of, wait_for
from .history import BUCKET, GENERATE_FAILED, TRAIN

MakeApp = Callable[..., DropkilnApp]


async def last_event(db: Path, stream: str) -> StoredEvent:
    async with await EventStore.open(db) as store:
        return (await store.last(stream))[0]


async def select(pilot: Pilot[None], job_id: str) -> None:
    table = pilot.app.screen.query_one(JobsTable)
    table.move_cursor(row=table.get_row_index(job_id))
    await pilot.pause()


async def test_c_asks_then_writes_cancel_requested(make_app: MakeApp, history_db: Path) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await select(pilot, TRAIN)
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Cancel train job “cats” (t7a9b3f2, running)?" in app.screen.question
        await pilot.press("y")
        await wait_for(pilot, lambda: app.jobs and _job(app, TRAIN).requested == "cancel")
        event = await last_event(history_db, job_stream(TRAIN))
        assert (event.type, event.data) == ("CancelRequested", {"by": "tui"})
        assert str(app.screen.query_one(JobsTable).get_cell(TRAIN, "state")) == "cancelling"


async def test_c_then_n_writes_nothing(make_app: MakeApp, history_db: Path) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await select(pilot, TRAIN)
        await pilot.press("c", "n")
        assert isinstance(app.screen, MainScreen)
        await pilot.pause(0.2)
    assert (await last_event(history_db, job_stream(TRAIN))).type == "JobProgress"


async def test_c_on_a_finished_job_explains_instead_of_asking(
    make_app: MakeApp, history_db: Path
) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        notes = record_notifications(app)
        await loaded(pilot)
        await select(pilot, BUCKET)
        await pilot.press("c")
        assert isinstance(app.screen, MainScreen)
        assert notes == ["Job b0c4e7a1 is succeeded: nothing to cancel."]
    assert (await last_event(history_db, job_stream(BUCKET))).type == "JobSucceeded"


async def test_r_retries_a_failed_job_after_yes(make_app: MakeApp, history_db: Path) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        notes = record_notifications(app)
        await loaded(pilot)
        await select(pilot, TRAIN)
        await pilot.press("r")
        assert notes == ["Job t7a9b3f2 is running: only failed or cancelled jobs are retried."]
        await select(pilot, GENERATE_FAILED)
        await pilot.press("r")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#yes")
        await wait_for(pilot, lambda: _job(app, GENERATE_FAILED).requested == "retry")
    event = await last_event(history_db, job_stream(GENERATE_FAILED))
    assert (event.type, event.data) == ("RetryRequested", {"by": "tui"})


async def test_p_pauses_and_resumes_the_queue(make_app: MakeApp, history_db: Path) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        status = app.screen.query_one(StatusBar)
        await pilot.press("p")
        await wait_for(pilot, lambda: "queue paused" in text_of(status))
        assert (await last_event(history_db, DAEMON_STREAM)).type == "QueuePaused"
        await pilot.press("p")
        await wait_for(pilot, lambda: "queue running" in text_of(status))
        event = await last_event(history_db, DAEMON_STREAM)
        assert (event.type, event.data) == ("QueueResumed", {"by": "tui"})


async def test_slash_filters_the_log_by_job_and_type(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        log = app.screen.query_one(EventLog)
        await pilot.press("slash")
        assert isinstance(app.screen, FilterScreen)
        await pilot.press(*"g5f0")
        app.screen.query_one("#types", Input).value = "oom, fail"
        await pilot.press("enter")
        await wait_for(pilot, lambda: log.border_title and "g5f0d1e8" in log.border_title)
        await wait_for(pilot, lambda: len(log.lines) == 3)
        lines = log_lines(log)
        assert [line.split()[2] for line in lines] == ["OutOfMemory", "OutOfMemory", "JobFailed"]
        assert all("job:g5f0d1e8" in line for line in lines)
        await pilot.press("slash")
        for field in app.screen.query(Input):
            field.value = ""
        await pilot.press("enter")
        await wait_for(pilot, lambda: log.border_title == "Events")
        await wait_for(pilot, lambda: len(log.lines) > 50)


async def test_slash_rejects_an_unknown_event_type(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("slash")
        app.screen.query_one("#types", Input).value = "bogus"
        await pilot.press("enter")
        assert isinstance(app.screen, FilterScreen)
        assert "no event type matches 'bogus'" in text_of(app.screen.query_one("#filter-error"))
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_enter_opens_the_job_and_escape_goes_back(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await select(pilot, TRAIN)
        await pilot.press("enter")
        assert isinstance(app.screen, JobScreen) and app.screen.job_id == TRAIN
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_question_mark_lists_every_key(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        keys = {key for key, _ in app.screen.keys}
        assert {"enter", "c", "r", "/", "p", "?", "q"} <= keys
        await pilot.press("escape")
        await select(pilot, TRAIN)
        await pilot.press("enter", "question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert {"escape", "c", "r", "p", "?", "q"} <= {key for key, _ in app.screen.keys}


async def test_q_quits(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


def _job(app: DropkilnApp, job_id: str):  # type: ignore[no-untyped-def]
    return next(job for job in app.jobs if job.id == job_id)
