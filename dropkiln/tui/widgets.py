"""The panels of the dashboard; each watches the app's reactive state and redraws itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, RichLog, Sparkline, Static

from dropkiln.store import JobView, StoredEvent
from dropkiln.tui import format as fmt
from dropkiln.tui.reads import LogFilter, Overview, read_log

if TYPE_CHECKING:
    from dropkiln.tui.app import DropkilnApp

WIDE_AT = 118
"""Terminal width from which the jobs table has step, it/s, ETA and loss columns."""


class Panel:
    """Mixin: typed access to the dashboard app."""

    @property
    def dashboard(self) -> DropkilnApp:
        return cast("DropkilnApp", cast(Any, self).app)


class StatusBar(Panel, Static):
    """Daemon up or down, device, queue state and job counts, on one line."""

    def on_mount(self) -> None:
        for name in ("overview", "now", "jobs", "problem", "loaded"):
            self.watch(self.app, name, self.redraw, init=False)
        self.redraw()

    def redraw(self) -> None:
        app = self.dashboard
        line = Text.assemble((" dropkiln ", "bold reverse"))
        line.append("  ")
        if app.problem and not app.loaded:
            line.append("✖ no database", style="bold red")
        elif not app.loaded:
            line.append("opening the store…", style="dim")
        else:
            line.append_text(daemon_text(app.overview, app.now))
            device = app.overview.daemon.device or _last_device(app.overview)
            if device:
                line.append(f"  {device}", style="bold")
            line.append("  ")
            if app.overview.paused:
                line.append("⏸ queue paused", style="bold yellow")
            else:
                line.append("▶ queue running", style="green")
            counts = job_counts(app.jobs)
            if counts and line.cell_len + len(counts) + 2 <= self.size.width:
                line.append(f"  {counts}", style="dim")
        self.update(line)

    def on_resize(self) -> None:
        self.redraw()


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
    order = ("running", "queued", "waiting", "failed")
    counts = {state: sum(1 for j in jobs if j.state == state) for state in order}
    return " · ".join(f"{n} {state}" for state, n in counts.items() if n)


BAR_WIDTH = 12


class MemoryPanel(Panel, Vertical):
    """Device memory now (bar), over the last minutes (sparkline), its peak, and the rung."""

    def compose(self) -> ComposeResult:
        yield Static(id="memory-label")
        with Horizontal(id="memory-graphs"):
            yield Static(id="memory-bar")
            yield Sparkline([], id="memory-sparkline")

    def on_mount(self) -> None:
        self.watch(self.app, "overview", self.redraw, init=False)
        self.watch(self.app, "jobs", self.redraw, init=False)
        self.redraw()

    def redraw(self) -> None:
        overview = self.dashboard.overview
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
            job = next((j for j in self.dashboard.jobs if j.id == latest.job_id), None)
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


class NowRunning(Panel, Static):
    """The running jobs' step, speed, ETA and loss (the wide jobs table has them as columns)."""

    def on_mount(self) -> None:
        self.watch(self.app, "jobs", self.redraw, init=False)
        self.watch(self.app, "overview", self.redraw, init=False)
        self.redraw()

    def redraw(self) -> None:
        running = [job for job in self.dashboard.jobs if job.state == "running"]
        if not running:
            waiting = sum(1 for j in self.dashboard.jobs if j.state == "queued")
            idle = "nothing running" + (f" · {waiting} queued" if waiting else "")
            if self.dashboard.overview.paused:
                idle += " · queue paused (p resumes)"
            self.update(Text(idle, style="dim"))
            return
        line = Text(no_wrap=True, overflow="ellipsis")
        for job in running:
            if line:
                line.append("   ")
            line.append("▶ ", style="bold cyan")
            line.append(f"{job.stage} {job.name} ", style="bold")
            line.append(fmt.running_summary(job))
        self.update(line)


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
    running = job.state == "running"
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


class JobsTable(Panel, DataTable[Any]):
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

    def on_mount(self) -> None:
        self.watch(self.app, "jobs", self.redraw, init=False)
        self.watch(self.app, "now", self.redraw, init=False)
        self.redraw()

    def on_resize(self) -> None:
        self.redraw()

    @property
    def selected_job(self) -> JobView | None:
        if not self._shown or not self.is_valid_row_index(self.cursor_row):
            return None
        job_id = self._shown[self.cursor_row]
        return next((job for job in self.dashboard.jobs if job.id == job_id), None)

    def redraw(self) -> None:
        jobs = self.dashboard.jobs
        wide = self.app.size.width >= WIDE_AT
        if wide != self._wide:
            self._wide = wide
            self.clear(columns=True)
            for label, width in WIDE_COLUMNS if wide else NARROW_COLUMNS:
                self.add_column(label, width=width, key=label)
            self._shown = ()
        now = self.dashboard.now
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


class EventLog(Panel, RichLog):
    """The live tail of the event log, optionally filtered by job and type."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=1000, min_width=20, wrap=False, auto_scroll=True, **kwargs)
        self.log_filter = LogFilter()
        self.shown_upto = 0
        self._pending: list[StoredEvent] | None = None

    def on_mount(self) -> None:
        self.border_title = "Events"
        self.dashboard.new_events.subscribe(self, self.add_events)
        self.watch(self.app, "loaded", self._on_loaded, init=True)

    def on_resize(self, event: events.Resize) -> None:
        # Textual calls RichLog's on_resize too (handlers run for each class of the MRO).
        # The first window can be written before the layout settles (the first reads are
        # quick), and its scroll to the end then lands short: after a resize, show the
        # newest lines again, as a write does with auto_scroll.
        if self.auto_scroll:
            self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)

    def _on_loaded(self, loaded: bool) -> None:
        if loaded and not self.log_filter.active and self.dashboard.initial_log:
            self.add_events(self.dashboard.initial_log)
        elif loaded:
            self.set_filter(self.log_filter)

    def set_filter(self, log_filter: LogFilter) -> None:
        """Show what ``log_filter`` lets through, from the last window of the log on."""
        self.log_filter = log_filter
        self.border_title = f"Events — {log_filter.label()}" if log_filter.active else "Events"
        self._pending = []
        self.reload()

    @work(exclusive=True, group="log-reload", exit_on_error=False)
    async def reload(self) -> None:
        log_filter = self.log_filter
        window = await self.dashboard.using_store(lambda store: read_log(store, log_filter))
        pending, self._pending = self._pending or [], None
        self.clear()
        self.shown_upto = 0
        self.add_events(window + pending)

    def add_events(self, batch: list[StoredEvent]) -> None:
        if self._pending is not None:
            self._pending.extend(batch)
            return
        root = self.dashboard.root
        lines = [
            fmt.event_line(event, root=root)
            for event in batch
            if event.seq > self.shown_upto and self.log_filter.matches(event)
        ]
        if lines:
            # One write for the batch: RichLog measures and renders per call.
            self.write(Text("\n", no_wrap=True, overflow="ellipsis").join(lines))
        if batch:
            self.shown_upto = max(self.shown_upto, batch[-1].seq)
