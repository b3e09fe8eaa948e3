"""Read models over the projections: what `status`, the dashboard, the API and the scheduler
ask. Each read is one snapshot (``EventStore.snapshot``) running the SQL text below; no read
replays the log, and none imports SQLAlchemy (see ``sqlite``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropkiln.store import dialect, sqlite
from dropkiln.store.errors import StoreError
from dropkiln.store.eventstore import HIGH_RATE_TYPE, EventStore, newest_events, stored_events
from dropkiln.store.stored import DAEMON_STREAM, JOB_PREFIX, job_stream
from dropkiln.store.telemetry import daemon_state
from dropkiln.store.vocabulary import TERMINAL_STATES, DropState, JobState, Lane

Row = dict[str, Any]


@dataclass(frozen=True)
class JobView:
    """A job row as readers see it; ``state`` is ``waiting`` while dependencies are unfinished."""

    id: str
    stage: str
    name: str
    lane: Lane
    priority: int
    state: JobState
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
    executor: str | None = None
    """The executor (host/device) that claimed the latest attempt."""
    device_class: str | None = None
    """Only an executor of this device class may claim it (None: any may)."""

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
            "device_class": self.device_class,
            "executor": self.executor,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobView))
_JOB_SELECT = f"SELECT {', '.join(_JOB_FIELDS)} FROM jobs"
_ID_AT = _JOB_FIELDS.index("id")
_STATE_AT = _JOB_FIELDS.index("state")
_LANE_AT = _JOB_FIELDS.index("lane")
_DEPENDS_AT = _JOB_FIELDS.index("depends_on")


def _placeholders(name: str, values: Sequence[Any], params: dict[str, Any]) -> str:
    """``:name0, :name1, ...`` for an IN list, with the values added to ``params``."""
    names = [f"{name}{i}" for i in range(len(values))]
    params.update(zip(names, values, strict=True))
    return ", ".join(f":{n}" for n in names)


def _job_rows(conn: sqlite.Connection, sql: str, params: dict[str, Any]) -> list[list[Any]]:
    return [list(row) for row in conn.execute(sql, params)]


def _job_views(conn: sqlite.Connection, rows: list[list[Any]]) -> list[JobView]:
    """Views of job rows; ``queued`` becomes ``waiting`` while a dependency is unfinished."""
    states = {row[_ID_AT]: row[_STATE_AT] for row in rows}
    deps = sorted({dep for row in rows for dep in row[_DEPENDS_AT]} - states.keys())
    if deps:
        params: dict[str, Any] = {}
        sql = f"SELECT id, state FROM jobs WHERE id IN ({_placeholders('id', deps, params)})"
        states.update({r["id"]: r["state"] for r in conn.execute(sql, params)})
    for row in rows:
        row[_LANE_AT] = Lane(row[_LANE_AT])
        row[_STATE_AT] = JobState(row[_STATE_AT])
        if row[_STATE_AT] == JobState.QUEUED and any(
            states.get(dep) != JobState.SUCCEEDED for dep in row[_DEPENDS_AT]
        ):
            row[_STATE_AT] = JobState.WAITING
    return [JobView(*row) for row in rows]


async def list_jobs(
    store: EventStore, *, limit: int | None = None, active_only: bool = False
) -> list[JobView]:
    """Jobs newest first."""
    params: dict[str, Any] = {}
    sql = _JOB_SELECT
    if active_only:
        sql += f" WHERE state NOT IN ({_placeholders('state', sorted(TERMINAL_STATES), params)})"
    sql += " ORDER BY submitted_seq DESC"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = limit
    return await store.snapshot(lambda conn: _job_views(conn, _job_rows(conn, sql, params)))


async def find_job(store: EventStore, ref: str) -> JobView:
    """A job by id or unambiguous id prefix; StoreError otherwise."""
    escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    exact = (f"{_JOB_SELECT} WHERE id = :ref", {"ref": ref})
    prefixed = (
        f"{_JOB_SELECT} WHERE id LIKE :prefix ESCAPE '\\' LIMIT 6",
        {"prefix": escaped + "%"},
    )

    def work(conn: sqlite.Connection) -> JobView:
        rows = _job_rows(conn, *exact) or _job_rows(conn, *prefixed)
        if not rows:
            raise StoreError(f"no job {ref!r}")
        if len(rows) > 1:
            shown = ", ".join(row[_ID_AT] for row in rows[:5])
            raise StoreError(f"job id {ref!r} is ambiguous: it matches {shown}")
        return _job_views(conn, rows)[0]

    return await store.snapshot(work)


def _dicts(conn: sqlite.Connection, sql: str, params: dict[str, Any] | None = None) -> list[Row]:
    return [dict(row) for row in conn.execute(sql, params or {})]


async def job_artifacts(store: EventStore, job_id: str) -> list[Row]:
    sql = "SELECT * FROM artifacts WHERE job_id = :job_id ORDER BY seq"
    return await store.snapshot(lambda conn: _dicts(conn, sql, {"job_id": job_id}))


async def dependency_artifacts(
    store: EventStore, job_ids: Sequence[str], kinds: Sequence[str]
) -> list[Row]:
    """The artifacts of these kinds that these jobs recorded (the files a dependent reads)."""
    params: dict[str, Any] = {}
    sql = (
        f"SELECT * FROM artifacts WHERE job_id IN ({_placeholders('job', job_ids, params)}) "
        f"AND kind IN ({_placeholders('kind', kinds, params)}) ORDER BY seq"
    )
    return await store.snapshot(lambda conn: _dicts(conn, sql, params))


async def artifact_by_seq(store: EventStore, seq: int) -> Row | None:
    """The artifact whose latest ArtifactWritten event has this seq (its id in the HTTP API)."""
    sql = "SELECT * FROM artifacts WHERE seq = :seq LIMIT 1"
    found = await store.snapshot(lambda conn: _dicts(conn, sql, {"seq": seq}))
    return found[0] if found else None


async def trained_loras(store: EventStore, limit: int = 100) -> list[tuple[JobView, list[Row]]]:
    """Succeeded train jobs, newest first, each with its artifacts."""
    sql = (
        f"{_JOB_SELECT} WHERE stage = 'train' AND state = :succeeded "
        "ORDER BY submitted_seq DESC LIMIT :limit"
    )

    def work(conn: sqlite.Connection) -> list[tuple[JobView, list[Row]]]:
        views = _job_views(
            conn, _job_rows(conn, sql, {"limit": limit, "succeeded": JobState.SUCCEEDED})
        )
        params: dict[str, Any] = {}
        ids = _placeholders("job", [view.id for view in views], params)
        by_job: dict[str, list[Row]] = {}
        if views:
            found = f"SELECT * FROM artifacts WHERE job_id IN ({ids}) ORDER BY seq"
            for row in _dicts(conn, found, params):
                by_job.setdefault(row["job_id"], []).append(row)
        return [(view, by_job.get(view.id, [])) for view in views]

    return await store.snapshot(work)


async def list_drops(store: EventStore, limit: int = 100) -> list[Row]:
    sql = "SELECT * FROM drops ORDER BY at DESC LIMIT :limit"
    return await store.snapshot(lambda conn: _dicts(conn, sql, {"limit": limit}))


_UNMOVED = f"""
SELECT * FROM drops
WHERE stored IS NOT NULL AND 'drop:' || id NOT IN (
    SELECT stream FROM events
    WHERE type IN ('DropMoved', 'DropMoveAbandoned') AND type != '{HIGH_RATE_TYPE}'
)
ORDER BY at
"""


async def unmoved_drops(store: EventStore) -> list[Row]:
    """Drops whose move to processed/ or failed/ was never recorded as done (DropMoved) or
    given up (DropMoveAbandoned), oldest first: what ``reconcile`` has left to finish."""
    return await store.snapshot(lambda conn: _dicts(conn, _UNMOVED))


async def waiting_drops(store: EventStore, limit: int = 50) -> list[Row]:
    """The latest DropWaiting of each source not taken since, newest first: drops the
    watcher holds back (``source``, ``reason``, ``at``). One removed by hand (no event says
    so) is left out because its source is gone."""
    recent = newest_events(DAEMON_STREAM, ("DropWaiting",), limit)
    taken = "SELECT id FROM drops WHERE source = :source AND at >= :at LIMIT 1"

    def work(conn: sqlite.Connection) -> list[Row]:
        found: dict[str, Row] = {}
        for event in stored_events(conn.execute(*recent)):
            source = event.data["source"]
            if source in found:
                continue
            since = conn.execute(taken, {"source": source, "at": event.at}).fetchone()
            if since is None and Path(source).exists():
                found[source] = {"source": source, "reason": event.data["reason"], "at": event.at}
        return list(found.values())

    return await store.snapshot(work)


async def drop_by_hash(store: EventStore, kind: str, content_hash: str) -> Row | None:
    """The first ingested drop with this content, if any."""
    sql = (
        "SELECT * FROM drops WHERE hash = :hash AND kind = :kind AND state = :ingested "
        "ORDER BY at LIMIT 1"
    )
    found = await store.snapshot(
        lambda conn: _dicts(
            conn, sql, {"hash": content_hash, "kind": kind, "ingested": DropState.INGESTED}
        )
    )
    return found[0] if found else None


async def remembered_rung(store: EventStore, rung_key: str) -> int:
    """The memory rung that last worked for this (model, stage, resolution), else 0."""
    sql = (
        "SELECT memory_rung FROM jobs WHERE rung_key = :key AND state = :succeeded "
        "ORDER BY finished_at DESC LIMIT 1"
    )

    def work(conn: sqlite.Connection) -> int:
        row = conn.execute(sql, {"key": rung_key, "succeeded": JobState.SUCCEEDED}).fetchone()
        return int(row[0] or 0) if row else 0

    return await store.snapshot(work)


async def clean_runs(store: EventStore, rung_key: str, rung: int, limit: int) -> int:
    """How many of the newest successful jobs of this key ran at ``rung`` without running
    out of memory, counted back to the first that did not (at most ``limit``)."""
    sql = (
        "SELECT memory_rung, EXISTS (SELECT 1 FROM events WHERE events.stream = :prefix || "
        "jobs.id AND events.type = 'OutOfMemory' AND events.type != :high_rate) "
        "FROM jobs WHERE rung_key = :key AND state = :succeeded "
        "ORDER BY finished_at DESC LIMIT :limit"
    )
    params = {
        "prefix": JOB_PREFIX,
        "high_rate": HIGH_RATE_TYPE,
        "key": rung_key,
        "succeeded": JobState.SUCCEEDED,
        "limit": limit,
    }

    def work(conn: sqlite.Connection) -> int:
        count = 0
        for memory_rung, ran_out in conn.execute(sql, params).fetchall():
            if memory_rung != rung or ran_out:
                break
            count += 1
        return count

    return await store.snapshot(work)


async def queue_paused(store: EventStore) -> bool:
    """Whether the last queue command was a pause."""
    last = await store.last(DAEMON_STREAM, types=("QueuePaused", "QueueResumed"))
    return bool(last) and last[0].type == "QueuePaused"


async def status_report(store: EventStore, limit: int | None = 50) -> dict[str, Any]:
    """The ``status --json`` document (also ``GET /v1/jobs``)."""
    jobs_found = await list_jobs(store, limit=limit)
    daemon = await daemon_state(store)
    paused = await queue_paused(store)
    now = time.time()
    return {
        "daemon": {
            "running": daemon.running(now),
            "pid": daemon.pid,
            "device": daemon.device,
            "seen_ago": daemon.seen_ago(now),
        },
        "paused": paused,
        "waiting": await waiting_drops(store),
        "jobs": [job.summary() for job in jobs_found],
    }


# One job's progress --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressHistory:
    updates: int
    """How many JobProgress events the job has."""
    losses: tuple[float, ...]
    """The newest training losses they carry, oldest first."""


async def progress_history(store: EventStore, job_id: str, loss_points: int) -> ProgressHistory:
    """A job's progress, counted, and the loss curve of its newest ``loss_points`` updates."""
    params = {"stream": job_stream(job_id), "limit": loss_points}
    of_job = "stream = :stream AND type = 'JobProgress'"
    count = f"SELECT count(*) FROM events WHERE {of_job}"

    def work(conn: sqlite.Connection) -> ProgressHistory:
        loss = dialect.json_number(conn, "data", "metrics", "loss")
        newest = (
            f"SELECT {loss} FROM events WHERE {of_job} AND {loss} IS NOT NULL "
            "ORDER BY seq DESC LIMIT :limit"
        )
        updates = int(conn.execute(count, params).fetchone()[0])
        losses = [float(row[0]) for row in conn.execute(newest, params)]
        return ProgressHistory(updates, tuple(losses[::-1]))

    return await store.snapshot(work)
