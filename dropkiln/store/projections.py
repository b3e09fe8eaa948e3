"""How each event changes the projections. Used live (same transaction) and by rebuild.

Every update here is a function of the event alone (no read-modify-write), so replaying
the log gives exactly the rows that were written live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Executable, delete, insert, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dropkiln.store.schema import artifacts, drops, jobs


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: its place in the log and its raw data."""

    seq: int
    stream: str
    version: int
    type: str
    data: dict[str, Any]
    at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "at": self.at,
            "data": self.data,
        }

    @property
    def job_id(self) -> str | None:
        return self.stream[4:] if self.stream.startswith("job:") else None


Statements = list[Executable]


def _job_update(event: StoredEvent, **values: Any) -> Statements:
    return [
        update(jobs)
        .where(jobs.c.id == event.job_id)
        .values(version=event.version, updated_at=event.at, **values)
    ]


def _submitted(e: StoredEvent) -> Statements:
    d = e.data
    return [
        insert(jobs).values(
            id=d["job_id"],
            stage=d["stage"],
            name=d["name"],
            drop_id=d.get("drop_id"),
            lane=d["lane"],
            priority=d["priority"],
            depends_on=d.get("depends_on", []),
            spec=d["spec"],
            rung_key=d.get("rung_key"),
            state="queued",
            attempt=0,
            memory_rung=d.get("memory_rung", 0),
            done=0,
            total=0,
            metrics={},
            requested=None,
            submitted_seq=e.seq,
            version=e.version,
            created_at=e.at,
            updated_at=e.at,
        )
    ]


def _artifact(e: StoredEvent) -> Statements:
    d = e.data
    values = {
        "seq": e.seq,
        "kind": d["kind"],
        "bytes": d.get("bytes"),
        "sha256": d.get("sha256"),
        "at": e.at,
    }
    upsert = sqlite_insert(artifacts).values(job_id=e.job_id, path=d["path"], **values)
    upsert = upsert.on_conflict_do_update(index_elements=["job_id", "path"], set_=values)
    return [upsert, *_job_update(e)]


def _drop(state: str) -> Callable[[StoredEvent], Statements]:
    def project(e: StoredEvent) -> Statements:
        d = e.data
        return [
            insert(drops).values(
                id=d["drop_id"],
                kind=d["kind"],
                name=d["name"],
                source=d["source"],
                stored=d.get("stored"),
                hash=d.get("hash"),
                state=state,
                reason=d.get("reason"),
                duplicate_of=d.get("duplicate_of"),
                at=e.at,
            )
        ]

    return project


PROJECTORS: dict[str, Callable[[StoredEvent], Statements]] = {
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


def statements_for(event: StoredEvent) -> Statements:
    """The projection updates one event causes (none for events without a projection)."""
    projector = PROJECTORS.get(event.type)
    if projector is not None:
        return projector(event)
    if event.job_id is not None:
        return _job_update(event)
    return []


def clear_statements() -> Statements:
    return [delete(artifacts), delete(jobs), delete(drops)]
