"""The two screens: the overview (jobs, memory, log) and one job in detail."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, RichLog, Sparkline, Static

from dropkiln.store import EventStore, JobView, StoredEvent, StoreError, find_job
from dropkiln.store.events import job_stream
from dropkiln.store.vocabulary import JobState
from dropkiln.tui import format as fmt
from dropkiln.tui.dialogs import FilterRequest, FilterScreen
from dropkiln.tui.messages import CancelJob, OpenJob, RetryJob
from dropkiln.tui.reads import JobDetail, LogFilter, Overview, read_job_detail
from dropkiln.tui.tail import LogTail
from dropkiln.tui.widgets import EventLog, JobsTable, MemoryPanel, NowRunning, StatusBar

FILTER_HELP = "Filter the event log by job and event type"


class DashboardScreen(Screen[None]):
    """A screen of the dashboard: the app binds the store's state to these reactives, and
    the screen binds them on to its widgets."""

    overview: reactive[Overview] = reactive(Overview)
    jobs: reactive[tuple[JobView, ...]] = reactive(tuple)
    now: reactive[float] = reactive(0.0)
    problem: reactive[str | None] = reactive(None)
    """Why the store cannot be read (missing database, read error), if it cannot."""
    loaded: reactive[bool] = reactive(False)
    """True once the first full read (jobs, overview) is done."""
    log_tail: reactive[LogTail] = reactive(LogTail)
    root: reactive[str] = reactive("")
    """The dropkiln ROOT, which paths are shown under."""
    store: reactive[EventStore | None] = reactive(None)
    """The open store, once it is; a screen reads its own details from it."""

    def status_bar(self) -> StatusBar:
        return StatusBar(id="status").data_bind(
            DashboardScreen.overview,
            DashboardScreen.jobs,
            DashboardScreen.now,
            DashboardScreen.problem,
            DashboardScreen.loaded,
        )


class MainScreen(DashboardScreen):
    """Header, device memory, the jobs and the live event log."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open_job", "Open", tooltip="Open the selected job"),
        Binding("c", "cancel", "Cancel", tooltip="Cancel the selected job (asks first)"),
        Binding("r", "retry", "Retry", tooltip="Retry the selected failed job (asks first)"),
        Binding("slash", "filter", "Filter", key_display="/", tooltip=FILTER_HELP),
    ]

    def compose(self) -> ComposeResult:
        yield self.status_bar()
        yield MemoryPanel(id="memory").data_bind(MainScreen.overview, MainScreen.jobs)
        yield NowRunning(id="now-running").data_bind(MainScreen.jobs, MainScreen.overview)
        yield Static(id="problem")
        with Vertical(id="jobs-panel"):
            yield JobsTable(id="jobs").data_bind(MainScreen.jobs, MainScreen.now)
        yield EventLog(id="log").data_bind(MainScreen.log_tail, MainScreen.root, MainScreen.store)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#jobs-panel").border_title = "Jobs"
        self.query_one(JobsTable).focus()

    def watch_problem(self, problem: str | None) -> None:
        notice = self.query_one("#problem", Static)
        notice.display = bool(problem)
        notice.update(Text(problem or "", style="bold"))

    @property
    def selected_job(self) -> JobView | None:
        return self.query_one(JobsTable).selected_job

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open_job()

    def action_open_job(self) -> None:
        job = self.selected_job
        if job is not None:
            self.post_message(OpenJob(job.id))

    def action_cancel(self) -> None:
        self.post_message(CancelJob(self.selected_job))

    def action_retry(self) -> None:
        self.post_message(RetryJob(self.selected_job))

    def action_filter(self) -> None:
        if not self.loaded:
            return  # the filtered window is read from the store, which is not open yet
        log = self.query_one(EventLog)
        job = self.selected_job
        self.app.push_screen(
            FilterScreen(log.log_filter, job.id if job else None), self._apply_filter
        )

    def _apply_filter(self, request: FilterRequest | None) -> None:
        if request is not None:
            self.resolve_filter(request)

    @work(exclusive=True, group="filter", exit_on_error=False)
    async def resolve_filter(self, request: FilterRequest) -> None:
        job_id = None
        if request.job and self.store is not None:
            try:
                job = await find_job(self.store, request.job)
                job_id = job.id
            except StoreError as exc:
                self.notify(str(exc), severity="error")
                return
        self.query_one(EventLog).set_filter(LogFilter(job_id, request.types))


class JobScreen(DashboardScreen):
    """One job: its state, error, loss curve, preview, artifacts and events, live."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to all jobs"),
        Binding("c", "cancel", "Cancel", tooltip="Cancel this job (asks first)"),
        Binding("r", "retry", "Retry", tooltip="Retry this job if it failed (asks first)"),
    ]

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.detail: JobDetail | None = None
        self._event_seqs: tuple[int, ...] = ()

    def compose(self) -> ComposeResult:
        yield self.status_bar()
        with Vertical(id="job-head"):
            yield Static(id="job-title")
            yield Static(id="job-facts")
            yield Static(id="job-progress")
            yield Static(id="job-error")
            with Horizontal(id="job-loss"):
                yield Label("loss ", id="loss-label")
                yield Sparkline([], id="loss-sparkline")
            yield Static(id="job-preview")
        with Horizontal(id="job-body"):
            with VerticalScroll(id="job-artifacts"):
                yield Static(id="artifact-list")
            yield RichLog(id="job-events", max_lines=1000, min_width=20, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#job-artifacts").border_title = "Artifacts"
        self.query_one("#job-events").border_title = "Events"
        self.query_one("#job-events").focus()

    def watch_store(self, store: EventStore | None) -> None:
        # The app hands the store down once this screen is mounted; read the job then.
        if store is not None and self.is_mounted:
            self.load()

    def watch_log_tail(self, before: LogTail, tail: LogTail) -> None:
        stream = job_stream(self.job_id)
        if self.is_mounted and any(event.stream == stream for event in tail.after(before.upto)):
            self.load()

    def watch_now(self) -> None:
        self._redraw()

    @work(exclusive=True, group="job-detail", exit_on_error=False)
    async def load(self) -> None:
        if self.store is None:
            return
        try:
            self.detail = await read_job_detail(self.store, self.job_id)
        except StoreError as exc:
            self.notify(str(exc), severity="error")
            return
        self._redraw()

    def _redraw(self) -> None:
        detail = self.detail
        if detail is None:
            return
        job, now = detail.job, self.now
        title = Text.assemble(
            (f" {job.stage} ", "bold reverse"), " ", (job.name, "bold"), "  ", fmt.state_text(job)
        )
        title.append(f"  {job.id}", style="dim")
        self.query_one("#job-title", Static).update(title)
        self.query_one("#job-facts", Static).update(_facts(detail, now))
        progress = fmt.bar(job.progress, 20, style=fmt.STATE_STYLES.get(job.state) or "cyan")
        progress.append(f" {job.progress * 100:3.0f}%  ")
        running = job.state == JobState.RUNNING
        progress.append(fmt.running_summary(job) if running else fmt.steps(job))
        if detail.progress_updates:
            progress.append(f" · {detail.progress_updates} updates", style="dim")
        progress.no_wrap, progress.overflow = True, "ellipsis"
        self.query_one("#job-progress", Static).update(progress)
        error = self.query_one("#job-error", Static)
        error.display = bool(job.error)
        error.update(Text(f"Error: {job.error}", style="bold red") if job.error else "")
        loss = self.query_one("#job-loss")
        loss.display = bool(detail.losses)
        if detail.losses:
            self.query_one("#loss-sparkline", Sparkline).data = list(detail.losses)
            last = detail.losses[-1]
            label = f"loss {min(detail.losses):.3f}–{max(detail.losses):.3f}, now {last:.4f} "
            self.query_one("#loss-label", Label).update(label)
        preview = self.query_one("#job-preview", Static)
        preview.display = detail.preview is not None
        label = "preview " if detail.preview_is_preview else "latest image "
        preview.update(Text.assemble((label, "bold green"), detail.preview or ""))
        self.query_one("#artifact-list", Static).update(_artifacts(detail, self.root))
        self._show_events(detail.events)

    def _show_events(self, events: tuple[StoredEvent, ...]) -> None:
        seqs = tuple(event.seq for event in events)
        if seqs == self._event_seqs:
            return
        log = self.query_one("#job-events", RichLog)
        new = [e for e in events if e.seq > self._event_seqs[-1]] if self._event_seqs else None
        if new is None or len(seqs) < len(self._event_seqs):
            log.clear()
            new = list(events)
        for event in new:
            log.write(fmt.event_line(event, with_stream=False, root=self.root))
        self._event_seqs = seqs

    def action_cancel(self) -> None:
        self.post_message(CancelJob(self.detail.job if self.detail else None))

    def action_retry(self) -> None:
        self.post_message(RetryJob(self.detail.job if self.detail else None))


def _facts(detail: JobDetail, now: float) -> Text:
    job = detail.job
    text = Text()
    if job.attempt:
        text.append(f"attempt {job.attempt} · ")
    rung = f" {detail.rung_name}" if detail.rung_name else ""
    text.append(f"rung {job.memory_rung}{rung}", style="cyan")
    created = fmt.parse_time(job.created_at)
    text.append(f" · submitted {fmt.clock_time(job.created_at)} ({fmt.age(now - created)} ago)")
    if job.started_at:
        text.append(f" · started {fmt.clock_time(job.started_at)}")
    if job.finished_at:
        text.append(f" · finished {fmt.clock_time(job.finished_at)}")
    if job.depends_on:
        text.append(f" · after {', '.join(fmt.short_id(d) for d in job.depends_on)}", style="dim")
    return text


def _artifacts(detail: JobDetail, root: str) -> Text:
    """One line each: kind, size, then the path under ROOT (absolute if elsewhere), which
    is cut at the panel's edge rather than wrapped."""
    if not detail.artifacts:
        return Text("none yet", style="dim")
    kind_width = max(len(str(a["kind"])) for a in detail.artifacts)
    text = Text(no_wrap=True, overflow="ellipsis")
    for artifact in detail.artifacts:
        if text:
            text.append("\n")
        text.append(f"{artifact['kind']:<{kind_width}} ", style="green")
        size = fmt.size(artifact["bytes"]) if artifact.get("bytes") is not None else ""
        text.append(f"{size:>9} ", style="dim")
        text.append(fmt.under_root(str(artifact["path"]), root))
    return text
