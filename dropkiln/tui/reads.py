"""What the dashboard reads, shaped for display: every read is bounded by a window, none
replays the log. The queries themselves are the store's (``dropkiln.store``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dropkiln.store import (
    DaemonState,
    EventStore,
    JobView,
    StoredEvent,
    TelemetrySample,
    daemon_state,
    find_job,
    job_artifacts,
    list_jobs,
    progress_history,
    queue_paused,
    recent_telemetry,
)
from dropkiln.store.events import EVENT_TYPES, job_stream

DaemonInfo = DaemonState
"""The daemon as the header shows it (the store's one definition of "running")."""
MEMORY_WINDOW_S = 300.0
JOB_LIMIT = 100
LOG_WINDOW = 150
DETAIL_EVENTS = 300
LOSS_POINTS = 2000
NOT_PROGRESS = tuple(name for name in EVENT_TYPES if name != "JobProgress")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RUNG_EVENTS = ("JobStarted", "RetryScheduled")
TYPE_ALIASES = {"oom": ("OutOfMemory",), "fail": ("JobFailed", "DropRejected")}


@dataclass(frozen=True)
class MemorySample:
    at: float
    device: str
    used: int | None
    total: int | None
    peak: int | None
    job_id: str | None
    memory_rung: int | None

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"


@dataclass(frozen=True)
class Overview:
    daemon: DaemonInfo = field(default_factory=DaemonInfo)
    paused: bool = False
    memory: tuple[MemorySample, ...] = ()
    running_rung: str | None = None
    """The rung name of the job the newest sample was taken for."""


@dataclass(frozen=True)
class LogFilter:
    """Which events the log shows: one job's, and/or some types; empty shows everything."""

    job_id: str | None = None
    types: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.job_id is not None or bool(self.types)

    def matches(self, event: StoredEvent) -> bool:
        if self.job_id is not None and event.stream != job_stream(self.job_id):
            return False
        return not self.types or event.type in self.types

    def label(self) -> str:
        parts = []
        if self.job_id:
            parts.append(f"job {self.job_id[:8]}")
        if len(self.types) > len(EVENT_TYPES) // 2:
            left_out = [name for name in EVENT_TYPES if name not in self.types]
            parts.append("all but " + ", ".join(left_out))
        elif self.types:
            parts.append(", ".join(self.types))
        return " · ".join(parts)


def event_types_for(words: str) -> tuple[str, ...]:
    """Event types named by comma- or space-separated words: a name, part of one, or ``oom``;
    a word starting with ``-`` leaves its types out (``-progress``: everything but progress)."""
    wanted: list[str] = []
    unwanted: set[str] = set()
    for word in words.replace(",", " ").split():
        key = word.lower().removeprefix("-")
        matches = TYPE_ALIASES.get(key) or tuple(n for n in EVENT_TYPES if key in n.lower())
        if not key or not matches:
            raise ValueError(f"no event type matches {word!r}")
        if word.startswith("-"):
            unwanted.update(matches)
        else:
            wanted.extend(m for m in matches if m not in wanted)
    if unwanted:
        wanted = [n for n in (wanted or EVENT_TYPES) if n not in unwanted]
    return tuple(wanted)


def _sample(row: TelemetrySample) -> MemorySample:
    used = next((v for v in (row.reserved, row.allocated, row.rss) if v is not None), None)
    return MemorySample(
        at=row.at,
        device=row.device,
        used=used,
        total=row.total,
        peak=row.peak,
        job_id=row.job_id,
        memory_rung=row.memory_rung,
    )


async def read_memory(store: EventStore, window_s: float = MEMORY_WINDOW_S) -> list[MemorySample]:
    """The samples of the last ``window_s`` before the newest one (so a stopped daemon's
    last minutes stay visible)."""
    return [_sample(row) for row in await recent_telemetry(store, window_s)]


async def read_overview(store: EventStore) -> Overview:
    """Daemon, queue and device memory: what the header and the memory panel show."""
    memory = await read_memory(store)
    latest = memory[-1] if memory else None
    daemon = await daemon_state(store)
    rung = await read_rung_name(store, latest.job_id) if latest and latest.job_id else None
    return Overview(
        daemon=daemon, paused=await queue_paused(store), memory=tuple(memory), running_rung=rung
    )


async def read_jobs(store: EventStore, limit: int = JOB_LIMIT) -> tuple[JobView, ...]:
    """The newest ``limit`` jobs and every unfinished one, newest first."""
    newest = await list_jobs(store, limit=limit)
    shown = {job.id for job in newest}
    older_active = [j for j in await list_jobs(store, active_only=True) if j.id not in shown]
    jobs = newest + older_active
    jobs.sort(key=lambda job: job.submitted_seq, reverse=True)
    return tuple(jobs)


RESHAPING = frozenset({"JobSubmitted", "JobSucceeded"})
"""Events after which the whole list is read again: a new job, or one whose dependents may
stop waiting."""
REFRESH_ONE_BY_ONE = 4


async def refresh_jobs(
    store: EventStore, jobs: tuple[JobView, ...], batch: list[StoredEvent]
) -> tuple[JobView, ...]:
    """``jobs`` updated for ``batch``: the touched jobs alone when that says it all."""
    touched = {event.job_id for event in batch if event.job_id}
    if not touched:
        return jobs
    shown = {job.id for job in jobs}
    if (
        touched - shown
        or len(touched) > REFRESH_ONE_BY_ONE
        or any(event.type in RESHAPING for event in batch)
    ):
        return await read_jobs(store)
    fresh = {job_id: await find_job(store, job_id) for job_id in touched}
    return tuple(fresh.get(job.id, job) for job in jobs)


async def read_log(
    store: EventStore, log_filter: LogFilter, limit: int = LOG_WINDOW
) -> list[StoredEvent]:
    """The newest ``limit`` events the filter lets through, oldest first."""
    stream = job_stream(log_filter.job_id) if log_filter.job_id else None
    newest = await store.last(stream, types=log_filter.types or None, limit=limit)
    return newest[::-1]


async def read_rung_name(store: EventStore, job_id: str) -> str | None:
    """The name of the memory rung the job runs (or will run) on."""
    last = await store.last(job_stream(job_id), types=RUNG_EVENTS)
    return str(last[0].data.get("rung_name")) if last else None


@dataclass(frozen=True)
class JobDetail:
    job: JobView
    events: tuple[StoredEvent, ...]
    progress_updates: int
    losses: tuple[float, ...]
    artifacts: tuple[dict[str, Any], ...]
    rung_name: str | None

    @property
    def preview_is_preview(self) -> bool:
        return any(a["kind"] == "preview" for a in self.artifacts)

    @property
    def preview(self) -> str | None:
        """The newest preview image's path; for a generation job without previews, its
        newest image."""
        previews = [a for a in self.artifacts if a["kind"] == "preview"]
        if not previews and self.job.stage == "generate":
            previews = [a for a in self.artifacts if str(a["path"]).endswith(IMAGE_SUFFIXES)]
        return str(max(previews, key=lambda a: a["seq"])["path"]) if previews else None


async def read_job_detail(store: EventStore, job_id: str) -> JobDetail:
    """A job's lifecycle events (progress counted, not listed), loss curve and artifacts."""
    job = await find_job(store, job_id)
    stream = job_stream(job.id)
    lifecycle = await store.last(stream, types=NOT_PROGRESS, limit=DETAIL_EVENTS)
    progress = await progress_history(store, job.id, LOSS_POINTS)
    rung = next((e.data.get("rung_name") for e in lifecycle if e.type in RUNG_EVENTS), None)
    return JobDetail(
        job=job,
        events=tuple(lifecycle[::-1]),
        progress_updates=progress.updates,
        losses=progress.losses,
        artifacts=tuple(await job_artifacts(store, job.id)),
        rung_name=None if rung is None else str(rung),
    )
