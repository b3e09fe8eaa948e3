"""How each event changes the projections. Used live (same transaction) and by rebuild.

Every change here is a function of the event alone (no read-modify-write), so replaying
the log gives exactly the rows that were written live. Changes are plain data; `apply`
runs them as SQL text made once per shape, because the write path is hot (thousands of
events a second) and building a SQLAlchemy statement per event costs more than SQLite.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import JSON, Table

from dropkiln.store.schema import PROJECTIONS, artifacts, drops, jobs
from dropkiln.store.stored import StoredEvent


@dataclass(frozen=True)
class RowChange:
    """One projection row written: inserted, updated by its key, or upserted on its key."""

    table: Table
    action: Literal["insert", "update", "upsert"]
    values: Mapping[str, Any]
    key: tuple[str, ...] = ()


Changes = list[RowChange]


def _job_update(event: StoredEvent, **values: Any) -> Changes:
    values.update(id=event.job_id, version=event.version, updated_at=event.at)
    return [RowChange(jobs, "update", values, key=("id",))]


def _submitted(e: StoredEvent) -> Changes:
    d = e.data
    row = {
        "id": d["job_id"],
        "stage": d["stage"],
        "name": d["name"],
        "drop_id": d.get("drop_id"),
        "lane": d["lane"],
        "priority": d["priority"],
        "depends_on": d.get("depends_on", []),
        "spec": d["spec"],
        "rung_key": d.get("rung_key"),
        "state": "queued",
        "attempt": 0,
        "memory_rung": d.get("memory_rung", 0),
        "done": 0,
        "total": 0,
        "metrics": {},
        "submitted_seq": e.seq,
        "version": e.version,
        "created_at": e.at,
        "updated_at": e.at,
    }
    return [RowChange(jobs, "insert", row)]


def _artifact(e: StoredEvent) -> Changes:
    d = e.data
    row = {
        "job_id": e.job_id,
        "path": d["path"],
        "seq": e.seq,
        "kind": d["kind"],
        "bytes": d.get("bytes"),
        "sha256": d.get("sha256"),
        "at": e.at,
    }
    return [RowChange(artifacts, "upsert", row, key=("job_id", "path")), *_job_update(e)]


def _drop(state: str) -> Callable[[StoredEvent], Changes]:
    def project(e: StoredEvent) -> Changes:
        d = e.data
        row = {
            "id": d["drop_id"],
            "kind": d["kind"],
            "name": d["name"],
            "source": d["source"],
            "stored": d.get("stored"),
            "hash": d.get("hash"),
            "state": state,
            "reason": d.get("reason"),
            "duplicate_of": d.get("duplicate_of"),
            "at": e.at,
        }
        return [RowChange(drops, "insert", row)]

    return project


PROJECTORS: dict[str, Callable[[StoredEvent], Changes]] = {
    "JobSubmitted": _submitted,
    "JobQueued": lambda e: _job_update(
        e, state="queued", error=None, finished_at=None, requested=None
    ),
    "JobStarted": lambda e: _job_update(
        e,
        state="running",
        attempt=e.data["attempt"],
        memory_rung=e.data["memory_rung"],
        started_at=e.at,
    ),
    "JobProgress": lambda e: _job_update(
        e, done=e.data["done"], total=e.data["total"], metrics=e.data.get("metrics", {})
    ),
    "CheckpointSaved": lambda e: _job_update(e, checkpoint=e.data["state"]),
    "ArtifactWritten": _artifact,
    "JobSucceeded": lambda e: _job_update(
        e, state="succeeded", result=e.data.get("result", {}), finished_at=e.at, requested=None
    ),
    "JobFailed": lambda e: _job_update(
        e, state="failed", error=e.data["reason"], finished_at=e.at, requested=None
    ),
    "JobCancelled": lambda e: _job_update(
        e, state="cancelled", error=e.data.get("reason"), finished_at=e.at, requested=None
    ),
    "OutOfMemory": lambda e: _job_update(e, state="queued"),
    "RetryScheduled": lambda e: _job_update(e, state="queued", memory_rung=e.data["next_rung"]),
    "JobPreempted": lambda e: _job_update(e, state="queued"),
    "JobInterrupted": lambda e: _job_update(e, state="queued"),
    "CancelRequested": lambda e: _job_update(e, requested="cancel"),
    "RetryRequested": lambda e: _job_update(e, requested="retry"),
    "Dropped": _drop("ingested"),
    "DropRejected": _drop("failed"),
    "DropRecognised": _drop("duplicate"),
}


def changes_for(event: StoredEvent) -> Changes:
    """The projection changes one event causes (none for events without a projection)."""
    projector = PROJECTORS.get(event.type)
    if projector is not None:
        return projector(event)
    if event.job_id is not None:
        return _job_update(event)
    return []


@functools.cache
def _json_columns(table: Table) -> frozenset[str]:
    return frozenset(c.name for c in table.columns if isinstance(c.type, JSON))


@functools.cache
def _sql(table: Table, action: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    for name in (*columns, *key):
        if name not in table.c:
            raise KeyError(f"{table.name} has no column {name!r}")
    if action == "update":
        assignments = ", ".join(f"{c} = :{c}" for c in columns if c not in key)
        where = " AND ".join(f"{k} = :{k}" for k in key)
        return f"UPDATE {table.name} SET {assignments} WHERE {where}"
    insert = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join(f':{c}' for c in columns)})"
    )
    if action == "insert":
        return insert
    assignments = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return f"{insert} ON CONFLICT ({', '.join(key)}) DO UPDATE SET {assignments}"


def apply(connection: sqlite3.Connection, changes: Iterable[RowChange]) -> None:
    """Write the changes on a connection that is inside a write transaction."""
    for change in changes:
        json_columns = _json_columns(change.table)
        params = {
            name: json.dumps(value) if name in json_columns and value is not None else value
            for name, value in change.values.items()
        }
        sql = _sql(change.table, change.action, tuple(change.values), change.key)
        connection.execute(sql, params)


def clear(connection: sqlite3.Connection) -> None:
    """Empty every projection (children first), inside a write transaction."""
    for table in reversed(PROJECTIONS):
        connection.execute(f"DELETE FROM {table.name}")
