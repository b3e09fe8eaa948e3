"""The panels of the dashboard. Each owns the reactives it draws from; the screen that
composes it hands them down with ``data_bind``."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import DataTable, RichLog, Sparkline, Static

from dropkiln.store import EventStore, JobView, StoredEvent
from dropkiln.store.vocabulary import JobState
from dropkiln.tui import format as fmt
from dropkiln.tui.reads import LogFilter, Overview, read_log
from dropkiln.tui.tail import LogTail

WIDE_AT = 118
"""Terminal width from which the jobs table has step, it/s, ETA and loss columns."""


class StatusBar(Widget):
    """Daemon up or down, device, queue state and job counts, on one line."""

    overview: reactive[Overview] = reactive(Overview)
    jobs: reactive[tuple[JobView, ...]] = reactive(tuple)
    now: reactive[float] = reactive(0.0)
    problem: reactive[str | None] = reactive(None)
    loaded: reactive[bool] = reactive(False)

    def render(self) -> Text:
        line = Text.assemble((" dropkiln ", "bold reverse"))
        line.append("  ")
        if self.problem and not self.loaded:
            line.append("✖ no database", style="bold red")
        elif not self.loaded:
            line.append("opening the store…", style="dim")
        else:
            line.append_text(daemon_text(self.overview, self.now))
            device = self.overview.daemon.device or _last_device(self.overview)
            if device:
                line.append(f"  {device}", style="bold")
            line.append("  ")
            if self.overview.paused:
                line.append("⏸ queue paused", style="bold yellow")
            else:
                line.append("▶ queue running", style="green")
            counts = job_counts(self.jobs)
            if counts and line.cell_len + len(counts) + 2 <= self.size.width:
                line.append(f"  {counts}", style="dim")
        return line


def _last_device(overview: Overview) -> str | None:
    return overview.memory[-1].device if overview.memory else None


def daemon_text(overview: Overview, now: float) -> Text:
    daemon = overview.daemon
    seen = daemon.seen_ago(now)
    if daemon.running(now):
        return Text.assemble(
            ("● daemon up", "bold green"), (f" · seen {fmt.age(seen or 0)} ago", "")
        )
    text = Text.assemble(("○ daemon not running", "bold red"))
    if seen is not None:
        text.append(f" · last seen {fmt.age(seen)} ago", style="red")
    elif daemon.last_event is None:
        text.append(" · never started", style="red")
    return text


def job_counts(jobs: tuple[JobView, ...]) -> str:
    order = (JobState.RUNNING, JobState.QUEUED, JobState.WAITING, JobState.FAILED)
    counts = {state: sum(1 for j in jobs if j.state == state) for state in order}
    return " · ".join(f"{n} {state}" for state, n in counts.items() if n)


BAR_WIDTH = 12


class MemoryPanel(Vertical):
    """Device memory now (bar), over the last minutes (sparkline), its peak, and the rung."""

    overview: reactive[Overview] = reactive(Overview)
    jobs: reactive[tuple[JobView, ...]] = reactive(tuple)

    def compose(self) -> ComposeResult:
        yield Static(id="memory-label")
        with Horizontal(id="memory-graphs"):
            yield Static(id="memory-bar")
            yield Sparkline([], id="memory-sparkline")

    def watch_overview(self) -> None:
        self.redraw()

    def watch_jobs(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        if not self.is_mounted:
            return
        overview = self.overview
        label = self.query_one("#memory-label", Static)
        bar = self.query_one("#memory-bar", Static)
        sparkline = self.query_one("#memory-sparkline", Sparkline)
        if not overview.memory:
            label.update(Text("device memory: no samples yet (the daemon records them)", "dim"))
            bar.update("")
            sparkline.data = []
            return
        latest = overview.memory[-1]
        title = Text()
        if latest.is_cpu:
            title.append("RAM of the daemon — no GPU", style="bold")
        else:
            title.append(f"{latest.device} memory", style="bold")
        if latest.memory_rung is not None:
            name = f" {overview.running_rung}" if overview.running_rung else ""
            title.append(f" · rung {latest.memory_rung}{name}", style="cyan")
            job = next((j for j in self.jobs if j.id == latest.job_id), None)
            if job is not None:
                title.append(f" ({job.stage} {job.name})", style="dim")
        label.update(title)
        peak = max((s.peak or s.used or 0 for s in overview.memory), default=0)
        fraction = (latest.used or 0) / latest.total if latest.total else 0.0
        usage = fmt.bar(fraction, BAR_WIDTH, style="red" if fraction > 0.9 else "green")
        usage.append(f" {fmt.size(latest.used)} / {fmt.size(latest.total)}")
        usage.append(f" · peak {fmt.size(peak)}", style="magenta")
        bar.update(usage)
        sparkline.data = [float(s.used or 0) for s in overview.memory]


class NowRunning(Widget):
    """The running jobs' step, speed, ETA and loss (the wide jobs table has them as columns)."""

    jobs: reactive[tuple[JobView, ...]] = reactive(tuple)
    overview: reactive[Overview] = reactive(Overview)

    def render(self) -> Text:
        running = [job for job in self.jobs if job.state == JobState.RUNNING]
        if not running:
            waiting = sum(1 for j in self.jobs if j.state == JobState.QUEUED)
            idle = "nothing running" + (f" · {waiting} queued" if waiting else "")
            if self.overview.paused:
                idle += " · queue paused (p resumes)"
            return Text(idle, style="dim")
        line = Text(no_wrap=True, overflow="ellipsis")
        for job in running:
            if line:
                line.append("   ")
            line.append("▶ ", style="bold cyan")
            line.append(f"{job.stage} {job.name} ", style="bold")
            line.append(fmt.running_summary(job))
        return line


NARROW_COLUMNS = (
    ("id", 8),
    ("kind", 8),
    ("name", 12),
    ("state", 10),
    ("progress", 11),
    ("att", 3),
    ("rung", 4),
    ("age", 4),
)
WIDE_COLUMNS = (
    ("id", 8),
    ("kind", 8),
    ("name", 16),
    ("state", 10),
    ("progress", 11),
    ("step", 11),
    ("it/s", 5),
    ("ETA", 6),
    ("loss", 6),
    ("att", 3),
    ("rung", 4),
    ("age", 4),
)


def job_cells(job: JobView, now: float) -> dict[str, Any]:
    """Every column's cell for one job (a narrow table shows some of them)."""
    it_s = fmt.metric(job.metrics, "it_s")
    eta_s = fmt.eta_seconds(job)
    loss = fmt.metric(job.metrics, "loss")
    running = job.state == JobState.RUNNING
    return {
        "id": fmt.short_id(job.id),
        "kind": job.stage,
        "name": job.name,
        "state": fmt.state_text(job),
        "progress": fmt.progress_cell(job),
        "step": fmt.steps(job) if job.total and not job.terminal else "",
        "it/s": f"{it_s:.1f}" if running and it_s is not None else "",
        "ETA": fmt.duration(eta_s) if running and eta_s is not None else "",
        "loss": f"{loss:.4f}" if loss is not None else "",
        "att": str(job.attempt) if job.attempt else "",
        "rung": str(job.memory_rung) if job.attempt else "",
        "age": fmt.age(now - fmt.parse_time(job.created_at)),
    }


class JobsTable(DataTable[Any]):
    """Jobs newest first; redrawn cell by cell so the selection stays put."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Open", tooltip="Open the selected job")
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self._wide: bool | None = None
        self._shown: tuple[str, ...] = ()
        self._drawn: dict[str, JobView] = {}
        self._drawn_at = 0.0

    jobs: reactive[tuple[JobView, ...]] = reactive(tuple)
    now: reactive[float] = reactive(0.0)

    def watch_jobs(self) -> None:
        self.redraw()

    def watch_now(self) -> None:
        self.redraw()

    def on_resize(self) -> None:
        self.redraw()

    @property
    def selected_job(self) -> JobView | None:
        if not self._shown or not self.is_valid_row_index(self.cursor_row):
            return None
        job_id = self._shown[self.cursor_row]
        return next((job for job in self.jobs if job.id == job_id), None)

    def redraw(self) -> None:
        if not self.is_mounted:
            return
        jobs = self.jobs
        wide = self.app.size.width >= WIDE_AT
        if wide != self._wide:
            self._wide = wide
            self.clear(columns=True)
            for label, width in WIDE_COLUMNS if wide else NARROW_COLUMNS:
                self.add_column(label, width=width, key=label)
            self._shown = ()
        now = self.now
        columns = [str(c.key.value) for c in self.ordered_columns]
        ids = tuple(job.id for job in jobs)
        if ids != self._shown:
            self._rebuild(jobs, columns, now)
        else:
            # Only rows whose job changed, or whose age may read differently, are redrawn:
            # with hundreds of rows this keeps a progress event cheap.
            aged = now != self._drawn_at
            for job in jobs:
                if self._drawn.get(job.id) != job:
                    cells = job_cells(job, now)
                    for column in columns:
                        if self.get_cell(job.id, column) != cells[column]:
                            self.update_cell(job.id, column, cells[column])
                elif aged:
                    age = job_cells(job, now)["age"]
                    if self.get_cell(job.id, "age") != age:
                        self.update_cell(job.id, "age", age)
        self._drawn = {job.id: job for job in jobs}
        self._drawn_at = now

    def _rebuild(self, jobs: tuple[JobView, ...], columns: list[str], now: float) -> None:
        selected = self.selected_job.id if self.selected_job else None
        self.clear()
        for job in jobs:
            cells = job_cells(job, now)
            self.add_row(*(cells[c] for c in columns), key=job.id)
        self._shown = tuple(job.id for job in jobs)
        if selected in self._shown:
            self.move_cursor(row=self._shown.index(selected), animate=False)


class EventLog(RichLog):
    """The live tail of the event log, optionally filtered by job and type."""

    log_tail: reactive[LogTail] = reactive(LogTail)
    root: reactive[str] = reactive("")
    """The dropkiln ROOT, which paths in event lines are shown under."""

    store: reactive[EventStore | None] = reactive(None)
    """Where a filtered window is read from."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=1000, min_width=20, wrap=False, auto_scroll=True, **kwargs)
        self.log_filter = LogFilter()
        self.shown_upto = 0
        self._pending: list[StoredEvent] | None = None

    def on_mount(self) -> None:
        self.border_title = "Events"

    def watch_log_tail(self, tail: LogTail) -> None:
        self.add_events(list(tail.after(self.shown_upto)))

    def on_resize(self, event: events.Resize) -> None:
        # Textual calls RichLog's on_resize too (handlers run for each class of the MRO).
        # The first window can be written before the layout settles (the first reads are
        # quick), and its scroll to the end then lands short: after a resize, show the
        # newest lines again, as a write does with auto_scroll.
        if self.auto_scroll:
            self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)

    def set_filter(self, log_filter: LogFilter) -> None:
        """Show what ``log_filter`` lets through, from the last window of the log on."""
        self.log_filter = log_filter
        self.border_title = f"Events — {log_filter.label()}" if log_filter.active else "Events"
        self._pending = []
        self.reload()

    @work(exclusive=True, group="log-reload", exit_on_error=False)
    async def reload(self) -> None:
        log_filter = self.log_filter
        store = self.store
        window = await read_log(store, log_filter) if store is not None else []
        pending, self._pending = self._pending or [], None
        self.clear()
        self.shown_upto = 0
        self.add_events(window + pending)

    def add_events(self, batch: list[StoredEvent]) -> None:
        if self._pending is not None:
            self._pending.extend(batch)
            return
        lines = [
            fmt.event_line(event, root=self.root)
            for event in batch
            if event.seq > self.shown_upto and self.log_filter.matches(event)
        ]
        if lines:
            # One write for the batch: RichLog measures and renders per call.
            self.write(Text("\n", no_wrap=True, overflow="ellipsis").join(lines))
        if batch:
            self.shown_upto = max(self.shown_upto, batch[-1].seq)
