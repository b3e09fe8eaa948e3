"""The dashboard app: opens the store, polls it in workers, hands what it read down to the
screens with ``data_bind``, and writes the command events the screens ask for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from textual import on, work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from dropkiln.store import EventStore, JobView, StoredEvent, StoreError
from dropkiln.store import backend as store_backend
from dropkiln.store.events import (
    DAEMON_STREAM,
    CancelRequested,
    Event,
    QueuePaused,
    QueueResumed,
    RetryRequested,
    job_stream,
)
from dropkiln.store.vocabulary import JobState
from dropkiln.tui.dialogs import ConfirmScreen, HelpScreen
from dropkiln.tui.messages import CancelJob, OpenJob, RetryJob
from dropkiln.tui.reads import (
    LogFilter,
    Overview,
    read_jobs,
    read_log,
    read_overview,
    refresh_jobs,
)
from dropkiln.tui.screens import DashboardScreen, JobScreen, MainScreen
from dropkiln.tui.tail import LogTail
from dropkiln.tui.widgets import WIDE_AT

TALL_AT = 32
"""Terminal height from which sparklines get several rows."""

S = TypeVar("S", bound=DashboardScreen)
POLL_BATCH = 500
STATUS_INTERVAL_S = 1.0
REOPEN_INTERVAL_S = 1.0
PAUSE_HELP = "Pause or resume the queue (running jobs finish; nothing new starts)"
CANCELLABLE = frozenset({JobState.QUEUED, JobState.WAITING, JobState.RUNNING})
RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED})


def missing_database_text(db_path: Path) -> str:
    root = db_path.parent.parent
    return (
        f"No dropkiln database at {db_path}.\n\n"
        f"Create one with   dropkiln init {root}\n"
        f"then start        dropkiln daemon --root {root}\n\n"
        "This screen picks it up as soon as it exists."
    )


class DropkilnApp(App[None]):
    """Watch and steer dropkiln: jobs, device memory and the event log, live."""

    CSS_PATH = "dropkiln.tcss"
    TITLE = "dropkiln"
    ENABLE_COMMAND_PALETTE = False
    # Textual types this as an instance attribute, so mypy refuses a ClassVar annotation.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (WIDE_AT, "-wide")]  # noqa: RUF012
    VERTICAL_BREAKPOINTS = [(0, "-short"), (TALL_AT, "-tall")]  # noqa: RUF012
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "toggle_pause", "Pause/resume", tooltip=PAUSE_HELP),
        Binding("question_mark", "help", "Help", key_display="?", tooltip="This list of keys"),
        Binding("q", "quit", "Quit", tooltip="Quit the dashboard (the daemon keeps running)"),
    ]

    overview: reactive[Overview] = reactive(Overview)
    jobs: reactive[tuple[JobView, ...]] = reactive(tuple)
    now: reactive[float] = reactive(0.0)
    problem: reactive[str | None] = reactive(None)
    """Why the store cannot be read (missing database, read error), if it cannot."""
    loaded: reactive[bool] = reactive(False)
    """True once the first full read (jobs, overview) is done and the polls run."""
    log_tail: reactive[LogTail] = reactive(LogTail)
    """The newest events read: the log's last window at start, then every poll's batch."""
    root: reactive[str] = reactive("")
    """The dropkiln ROOT: as the daemon announced it, else the one holding the database."""
    store: reactive[EventStore | None] = reactive(None)
    """The open store; None until the database exists and its first reads succeed."""

    def __init__(
        self,
        db_path: Path,
        poll_interval: float = 0.1,
        clock: Callable[[], float] = time.time,
        store_url: str = "",
    ) -> None:
        super().__init__()
        self.db_path = Path(db_path)
        self.store_url = store_url
        """"" for the SQLite file at db_path, else the PostgreSQL store's URL."""
        self.poll_interval = poll_interval
        self.clock = clock
        self._more_waiting = False
        self._daemon_was_up: bool | None = None
        self.set_reactive(DropkilnApp.root, str(self.db_path.parent.parent))

    @property
    def events_read(self) -> int:
        """Seq of the newest event the tail has read."""
        return self.log_tail.upto

    def watch_overview(self, overview: Overview) -> None:
        self.root = overview.daemon.root or str(self.db_path.parent.parent)

    def get_default_screen(self) -> Screen[Any]:
        return self.bound(MainScreen())

    def bound(self, screen: S) -> S:
        """``screen``, its reactives bound to the app's: the app reads, the screens show."""
        return screen.data_bind(
            DropkilnApp.overview,
            DropkilnApp.jobs,
            DropkilnApp.now,
            DropkilnApp.problem,
            DropkilnApp.loaded,
            DropkilnApp.log_tail,
            DropkilnApp.root,
            DropkilnApp.store,
        )

    def open_job(self, job_id: str) -> None:
        """Show the job ``job_id`` on its own screen."""
        self.push_screen(self.bound(JobScreen(job_id)))

    def on_mount(self) -> None:
        self.now = self.clock()
        self.open_store()

    async def on_unmount(self) -> None:
        # Reads still running finish first: the store lends their connections out and
        # closes each when it comes back.
        if self.store is not None:
            await self.store.close()

    # Reading --------------------------------------------------------------------------------

    def opened(self) -> EventStore:
        """The open store (the polls start only once it is)."""
        if self.store is None:
            raise StoreError(f"the store at {self.db_path} is not open")
        return self.store

    @work(exclusive=True, group="open", exit_on_error=False)
    async def open_store(self) -> None:
        """Open the store and read the current state; retry while the database is missing."""
        if not self.store_url and not self.db_path.exists():
            self.problem = missing_database_text(self.db_path)
            self.set_timer(REOPEN_INTERVAL_S, self.open_store)
            return
        try:
            store, (jobs, overview, window) = await _open(self.db_path, self.store_url)
        except (StoreError, OSError) as exc:
            self.problem = f"Cannot read {self.db_path}: {exc}"
            self.set_timer(REOPEN_INTERVAL_S, self.open_store)
            return
        self.store = store
        self.jobs, self.overview, self.now = jobs, overview, self.clock()
        self.log_tail = LogTail().extended(window)
        self.problem = None
        self._notice_daemon()
        self.loaded = True
        self.poll_events()
        self.poll_status()

    @work(exclusive=True, group="events", exit_on_error=False)
    async def poll_events(self) -> None:
        """Read what was appended since the last poll and hand it to the screens."""
        store = self.opened()
        batch = await store.read(self.events_read, limit=POLL_BATCH)
        self._more_waiting = len(batch) == POLL_BATCH
        if not batch:
            return
        self.log_tail = self.log_tail.extended(batch)
        self.jobs = await refresh_jobs(store, self.jobs, batch)
        if any(event.stream == DAEMON_STREAM for event in batch):
            await self._read_overview()

    @work(exclusive=True, group="status", exit_on_error=False)
    async def poll_status(self) -> None:
        """Heartbeat, queue state and device memory, about once a second."""
        await self._read_overview()

    async def _read_overview(self) -> None:
        self.overview = await read_overview(self.opened())
        self.now = self.clock()
        self._notice_daemon()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Re-arm a poll only once it has finished, so slow reads never pile up.
        worker = event.worker
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        if event.state == WorkerState.ERROR:
            self.problem = f"Reading {self.db_path} failed: {worker.error}"
        elif worker.group in ("events", "status") and self.problem:
            self.problem = None
        if worker.group == "events":
            if self._more_waiting:
                # At once; not set_timer(0.0), whose timer task dies dividing by its interval.
                self.call_later(self.poll_events)
            else:
                self.set_timer(self.poll_interval, self.poll_events)
        elif worker.group == "status":
            self.set_timer(STATUS_INTERVAL_S, self.poll_status)

    def _notice_daemon(self) -> None:
        up = self.overview.daemon.running(self.now)
        if self._daemon_was_up is not None and up != self._daemon_was_up:
            if up:
                self.notify(f"The daemon is back (pid {self.overview.daemon.pid}).")
            else:
                self.notify(
                    "The daemon is not running: showing its last state.", severity="warning"
                )
        self._daemon_was_up = up

    # Commands -------------------------------------------------------------------------------

    @on(OpenJob)
    def _open_job(self, message: OpenJob) -> None:
        self.open_job(message.job_id)

    @on(CancelJob)
    def _cancel_job(self, message: CancelJob) -> None:
        self.request_cancel(message.job)

    @on(RetryJob)
    def _retry_job(self, message: RetryJob) -> None:
        self.request_retry(message.job)

    def request_cancel(self, job: JobView | None) -> None:
        """Ask, then append CancelRequested to the job's stream."""
        if job is None:
            self.notify("No job selected.", severity="warning")
        elif job.state not in CANCELLABLE:
            self.notify(f"Job {job.id[:8]} is {job.state}: nothing to cancel.", severity="warning")
        elif job.requested == "cancel":
            self.notify(f"Cancel of {job.id[:8]} is already requested.")
        else:
            self._confirm(
                f"Cancel {job.stage} job “{job.name}” ({job.id[:8]}, {job.state})?\n"
                "A running job saves a checkpoint and stops.",
                "Cancel job",
                job_stream(job.id),
                CancelRequested(by="tui"),
                f"Cancel requested for {job.id[:8]}.",
            )

    def request_retry(self, job: JobView | None) -> None:
        """Ask, then append RetryRequested to the job's stream."""
        if job is None:
            self.notify("No job selected.", severity="warning")
        elif job.state not in RETRYABLE:
            self.notify(
                f"Job {job.id[:8]} is {job.state}: only failed or cancelled jobs are retried.",
                severity="warning",
            )
        else:
            self._confirm(
                f"Retry {job.stage} job “{job.name}” ({job.id[:8]}, {job.state})?\n"
                "It runs again from its last checkpoint.",
                "Retry job",
                job_stream(job.id),
                RetryRequested(by="tui"),
                f"Retry requested for {job.id[:8]}.",
            )

    def _confirm(self, question: str, label: str, stream: str, command: Event, done: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.send_command(stream, command, done)

        self.push_screen(ConfirmScreen(question, label), answered)

    def action_toggle_pause(self) -> None:
        if not self.loaded:
            return
        if self.overview.paused:
            self.send_command(DAEMON_STREAM, QueueResumed(by="tui"), "Queue resumed.")
        else:
            self.send_command(
                DAEMON_STREAM, QueuePaused(by="tui"), "Queue paused: running jobs finish."
            )

    @work(group="commands", exit_on_error=False)
    async def send_command(self, stream: str, command: Event, done: str) -> None:
        """Append one command event; the daemon tails the log and obeys it."""
        try:
            await self.opened().append(stream, [command])
        except StoreError as exc:
            self.notify(f"Could not write {command.type_name()}: {exc}", severity="error")
            return
        self.notify(done)

    def action_help(self) -> None:
        screen = self.screen
        if isinstance(screen, HelpScreen):
            return
        keys = [
            (
                active.binding.key_display or active.binding.key,
                active.binding.tooltip or active.binding.description,
            )
            for active in screen.active_bindings.values()
            if active.binding.show and active.binding.description
        ]
        self.push_screen(HelpScreen(keys))


async def _open(
    db_path: Path, store_url: str = ""
) -> tuple[EventStore, tuple[tuple[JobView, ...], Overview, list[StoredEvent]]]:
    """Open the store and read the jobs, the overview and the log's last window; if the
    reads fail the store is closed again."""
    store = await store_backend.open_store(db_path, store_url)
    try:
        # Nothing here grows with the length of the log: the tables come from the
        # projections and the log shows its last window, from whose end the tail goes on.
        # The reads run side by side; the tail may re-read what the window already holds,
        # never skip what it does not.
        first = await asyncio.gather(
            read_jobs(store), read_overview(store), read_log(store, LogFilter())
        )
    except BaseException:
        await store.close()
        raise
    return store, first


def run(root: Path, poll_interval: float = 0.1) -> None:
    """Run the dashboard on the dropkiln home at ``root`` until the user quits."""
    from dropkiln.paths import Paths

    paths = Paths(Path(root))
    DropkilnApp(paths.db, poll_interval=poll_interval, store_url=paths.store_url).run()
