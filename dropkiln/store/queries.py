"""Read models over the projections: what `status`, the TUI and the scheduler ask."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Connection, Select, Text, literal, select, type_coerce

from dropkiln.store.engine import StoreError
from dropkiln.store.events import DAEMON_STREAM
from dropkiln.store.eventstore import EventStore, newest_events, row_event
from dropkiln.store.projections import RowChange, apply
from dropkiln.store.schema import HIGH_RATE_TYPE, artifacts, drops, events, jobs, telemetry
from dropkiln.store.vocabulary import TERMINAL_STATES, DropState, JobState

DAEMON_LIFECYCLE = ("DaemonStarted", "DaemonStopping", "DaemonStopped")


@dataclass(frozen=True)
class JobView:
    """A job row as readers see it; ``state`` is ``waiting`` while dependencies are unfinished."""

    id: str
    stage: str
    name: str
    lane: str
    priority: int
    state: str
    attempt: int
    memory_rung: int
    done: int
    total: int
    metrics: dict[str, Any]
    depends_on: list[str]
    spec: dict[str, Any]
    result: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    error: str | None
    requested: str | None
    drop_id: str | None
    rung_key: str | None
    submitted_seq: int
    version: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str

    @property
    def progress(self) -> float:
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return self.done / self.total if self.total else 0.0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def summary(self) -> dict[str, Any]:
        """The ``status --json`` shape."""
        return {
            "id": self.id,
            "stage": self.stage,
            "name": self.name,
            "state": self.state,
            "progress": round(self.progress, 4),
            "attempt": self.attempt,
            "memory_rung": self.memory_rung,
            "done": self.done,
            "total": self.total,
            "metrics": self.metrics,
            "depends_on": self.depends_on,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


_JOB_JSON = frozenset(c.name for c in jobs.columns if isinstance(c.type, JSON))
_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobView))
# Columns in JobView's field order, JSON ones as text decoded here: for `status` listing
# thousands of jobs that is several times cheaper than SQLAlchemy's result processing.
_JOB_COLUMNS = [
    type_coerce(jobs.c[name], Text).label(name) if name in _JOB_JSON else jobs.c[name]
    for name in _JOB_FIELDS
]
_JSON_AT = tuple(i for i, name in enumerate(_JOB_FIELDS) if name in _JOB_JSON)
_ID_AT = _JOB_FIELDS.index("id")
_STATE_AT = _JOB_FIELDS.index("state")
_DEPENDS_AT = _JOB_FIELDS.index("depends_on")


def _job_rows(conn: Connection, query: Select[Any]) -> list[list[Any]]:
    rows = []
    for row in conn.execute(query):
        values = list(row)
        for i in _JSON_AT:
            if values[i] is not None:
                values[i] = json.loads(values[i])
        rows.append(values)
    return rows


def _job_views(conn: Connection, rows: list[list[Any]]) -> list[JobView]:
    """Views of job rows; ``queued`` becomes ``waiting`` while a dependency is unfinished."""
    states = {row[_ID_AT]: row[_STATE_AT] for row in rows}
    deps = {dep for row in rows for dep in row[_DEPENDS_AT]} - states.keys()
    if deps:
        found = conn.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(list(deps))))
        states.update({r.id: r.state for r in found})
    for row in rows:
        if row[_STATE_AT] == JobState.QUEUED and any(
            states.get(dep) != JobState.SUCCEEDED for dep in row[_DEPENDS_AT]
        ):
            row[_STATE_AT] = JobState.WAITING.value
    return [JobView(*row) for row in rows]


async def list_jobs(
    store: EventStore, *, limit: int | None = None, active_only: bool = False
) -> list[JobView]:
    """Jobs newest first."""
    query = select(*_JOB_COLUMNS).order_by(jobs.c.submitted_seq.desc())
    if active_only:
        query = query.where(jobs.c.state.not_in(list(TERMINAL_STATES)))
    if limit is not None:
        query = query.limit(limit)
    return await store.snapshot(lambda conn: _job_views(conn, _job_rows(conn, query)))


async def find_job(store: EventStore, ref: str) -> JobView:
    """A job by id or unambiguous id prefix; StoreError otherwise."""
    exact = select(*_JOB_COLUMNS).where(jobs.c.id == ref)
    prefixed = select(*_JOB_COLUMNS).where(jobs.c.id.startswith(ref, autoescape=True)).limit(6)

    def work(conn: Connection) -> JobView:
        rows = _job_rows(conn, exact) or _job_rows(conn, prefixed)
        if not rows:
            raise StoreError(f"no job {ref!r}")
        if len(rows) > 1:
            shown = ", ".join(row[_ID_AT] for row in rows[:5])
            raise StoreError(f"job id {ref!r} is ambiguous: it matches {shown}")
        return _job_views(conn, rows)[0]

    return await store.snapshot(work)


async def job_artifacts(store: EventStore, job_id: str) -> list[dict[str, Any]]:
    query = select(artifacts).where(artifacts.c.job_id == job_id).order_by(artifacts.c.seq)
    return await store.snapshot(lambda conn: [dict(r._mapping) for r in conn.execute(query)])


async def artifact_by_seq(store: EventStore, seq: int) -> dict[str, Any] | None:
    """The artifact whose latest ArtifactWritten event has this seq (its id in the HTTP API)."""
    query = select(artifacts).where(artifacts.c.seq == seq).limit(1)

    def work(conn: Connection) -> dict[str, Any] | None:
        row = conn.execute(query).first()
        return dict(row._mapping) if row else None

    return await store.snapshot(work)


async def trained_loras(
    store: EventStore, limit: int = 100
) -> list[tuple[JobView, list[dict[str, Any]]]]:
    """Succeeded train jobs, newest first, each with its artifacts."""
    query = (
        select(*_JOB_COLUMNS)
        .where(jobs.c.stage == "train", jobs.c.state == JobState.SUCCEEDED.value)
        .order_by(jobs.c.submitted_seq.desc())
        .limit(limit)
    )

    def work(conn: Connection) -> list[tuple[JobView, list[dict[str, Any]]]]:
        views = _job_views(conn, _job_rows(conn, query))
        found = select(artifacts).where(artifacts.c.job_id.in_([v.id for v in views]))
        by_job: dict[str, list[dict[str, Any]]] = {}
        for row in conn.execute(found.order_by(artifacts.c.seq)):
            by_job.setdefault(row.job_id, []).append(dict(row._mapping))
        return [(view, by_job.get(view.id, [])) for view in views]

    return await store.snapshot(work)


async def list_drops(store: EventStore, limit: int = 100) -> list[dict[str, Any]]:
    query = select(drops).order_by(drops.c.at.desc()).limit(limit)
    return await store.snapshot(lambda conn: [dict(r._mapping) for r in conn.execute(query)])


async def unmoved_drops(store: EventStore) -> list[dict[str, Any]]:
    """Drops whose move to processed/ or failed/ was never recorded as done (DropMoved) or
    given up (DropMoveAbandoned), oldest first: what ``reconcile`` has left to finish."""
    closed = (
        select(events.c.stream)
        .where(events.c.type.in_(["DropMoved", "DropMoveAbandoned"]))
        .where(events.c.type != literal(HIGH_RATE_TYPE, literal_execute=True))
    )
    query = (
        select(drops)
        .where(drops.c.stored.is_not(None))
        .where(("drop:" + drops.c.id).not_in(closed))
        .order_by(drops.c.at)
    )
    return await store.snapshot(lambda conn: [dict(r._mapping) for r in conn.execute(query)])


async def waiting_drops(store: EventStore, limit: int = 50) -> list[dict[str, Any]]:
    """The latest DropWaiting of each source not taken since, newest first: drops the
    watcher holds back (``source``, ``reason``, ``at``). One removed by hand (no event says
    so) is left out because its source is gone."""
    recent = newest_events(DAEMON_STREAM, ("DropWaiting",), limit)

    def work(conn: Connection) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for row in conn.execute(recent):
            event = row_event(row)
            source = event.data["source"]
            if source in found:
                continue
            taken = conn.execute(
                select(drops.c.id).where(drops.c.source == source, drops.c.at >= event.at)
            ).first()
            if taken is None and Path(source).exists():
                found[source] = {"source": source, "reason": event.data["reason"], "at": event.at}
        return list(found.values())

    return await store.snapshot(work)


async def drop_by_hash(store: EventStore, kind: str, content_hash: str) -> dict[str, Any] | None:
    """The first ingested drop with this content, if any."""
    query = (
        select(drops)
        .where(
            drops.c.hash == content_hash,
            drops.c.kind == kind,
            drops.c.state == DropState.INGESTED.value,
        )
        .order_by(drops.c.at)
        .limit(1)
    )

    def work(conn: Connection) -> dict[str, Any] | None:
        row = conn.execute(query).first()
        return dict(row._mapping) if row else None

    return await store.snapshot(work)


async def remembered_rung(store: EventStore, rung_key: str) -> int:
    """The memory rung that last worked for this (model, stage, resolution), else 0."""
    query = (
        select(jobs.c.memory_rung)
        .where(jobs.c.rung_key == rung_key, jobs.c.state == JobState.SUCCEEDED.value)
        .order_by(jobs.c.finished_at.desc())
        .limit(1)
    )
    return await store.snapshot(lambda conn: int(conn.execute(query).scalar() or 0))


async def queue_paused(store: EventStore) -> bool:
    """Whether the last queue command was a pause."""
    last = await store.last(DAEMON_STREAM, types=("QueuePaused", "QueueResumed"))
    return bool(last) and last[0].type == "QueuePaused"


async def status_report(store: EventStore, limit: int | None = 50) -> dict[str, Any]:
    """The ``status --json`` document (also ``GET /v1/jobs``)."""
    jobs_found = await list_jobs(store, limit=limit)
    daemon = await daemon_state(store)
    paused = await queue_paused(store)
    return {
        "daemon": {
            "running": daemon.running,
            "pid": daemon.pid,
            "device": daemon.device,
            "seen_ago": daemon.seen_ago,
        },
        "paused": paused,
        "waiting": await waiting_drops(store),
        "jobs": [job.summary() for job in jobs_found],
    }


@dataclass(frozen=True)
class DaemonState:
    running: bool
    last_event: str | None
    pid: int | None
    device: str | None
    seen_ago: float | None
    """Seconds since the daemon's last heartbeat (telemetry sample), if any."""


async def daemon_state(store: EventStore, heartbeat_timeout: float = 5.0) -> DaemonState:
    """Up or down, from the lifecycle events and the telemetry heartbeat."""
    lifecycle_query = newest_events(DAEMON_STREAM, DAEMON_LIFECYCLE, 1)
    started_query = newest_events(DAEMON_STREAM, ("DaemonStarted",), 1)
    beat_query = select(telemetry.c.at).order_by(telemetry.c.id.desc()).limit(1)

    def work(conn: Connection) -> tuple[Any, Any, float | None]:
        lifecycle = conn.execute(lifecycle_query).first()
        started = conn.execute(started_query).first()
        return lifecycle, started, conn.execute(beat_query).scalar()

    lifecycle, started, beat = await store.snapshot(work)
    seen_ago = time.time() - beat if beat is not None else None
    last_type = lifecycle.type if lifecycle else None
    running = last_type in ("DaemonStarted", "DaemonStopping") and (
        seen_ago is not None and seen_ago < heartbeat_timeout
    )
    info = row_event(started).data if started else {}
    return DaemonState(running, last_type, info.get("pid"), info.get("device"), seen_ago)


TELEMETRY_COLUMNS = tuple(c.name for c in telemetry.columns if c.name != "id")


async def record_telemetry(store: EventStore, sample: dict[str, Any], retention_s: float) -> None:
    """Store one device-memory sample and drop samples older than the retention window."""
    now = sample.get("at", time.time())
    values = {name: sample.get(name) for name in TELEMETRY_COLUMNS}
    values["at"] = now

    def work(conn: Any) -> None:
        apply(conn, [RowChange(telemetry, "insert", values)])
        conn.execute("DELETE FROM telemetry WHERE at < ?", (now - retention_s,))

    await store.transaction(work)


async def recent_telemetry(store: EventStore, seconds: float = 300.0) -> list[dict[str, Any]]:
    """Samples of the last ``seconds``, oldest first."""
    since = time.time() - seconds
    query = select(telemetry).where(telemetry.c.at >= since).order_by(telemetry.c.id)
    return await store.snapshot(lambda conn: [dict(r._mapping) for r in conn.execute(query)])
