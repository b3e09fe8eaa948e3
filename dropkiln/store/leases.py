"""Claims, leases and fencing: how several executors (daemons) share one store's jobs.

An executor claims a queued job in one write transaction: the job is still queued at the
version the scheduler read, a ``leases`` row names the executor, the attempt and
``lease_until``, and ``JobClaimed`` + ``JobStarted`` are appended. On PostgreSQL the job row
is taken with ``SELECT … FOR UPDATE SKIP LOCKED`` (the way procrastinate, Oban and
graphile-worker fetch a job), inside the advisory lock every append holds so that the log's
``seq`` follows commit order; on SQLite the write transaction (BEGIN IMMEDIATE) already
excludes every other writer.

While the attempt runs its executor renews the lease (``renew``, a row update, not an
event). Every write the attempt makes is fenced (``Fence``): it commits only while the
lease row still names that attempt and has not run out, in the same transaction, so a
paused executor that wakes after its job was claimed again writes nothing. A running job
whose lease ran out is requeued by any executor (``requeue_lost``) and claimed again; it
resumes from its last checkpoint.

Times are the store's clock (PostgreSQL's ``clock_timestamp()``; on SQLite, whose writers
share one box, this machine's), so boxes whose clocks disagree still agree on expiry.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dropkiln.store.errors import ConcurrencyError, StoreError
from dropkiln.store.events import Event, JobClaimed, job_stream
from dropkiln.store.eventstore import EventStore
from dropkiln.store.stored import StoredEvent
from dropkiln.store.vocabulary import JobState


class LeaseLost(StoreError):
    """The attempt's lease is gone (expired, or the job was claimed again): its write was
    refused and the attempt must stop."""


def executor_id(device: str, host: str | None = None) -> str:
    """The executor a daemon is: its host and its device. One daemon holds a (root, host,
    device) at a time (``daemon.lock``), so a daemon that finds leases under its own id at
    start-up knows their holder is dead."""
    return f"{host or socket.gethostname()}/{device}"


@dataclass(frozen=True)
class Fence:
    """What every write of one attempt carries: the store refuses it unless the job's lease
    still names this executor and attempt and has not run out."""

    job_id: str
    executor: str
    attempt: int


@dataclass(frozen=True)
class Claim:
    fence: Fence
    lease_until: float
    events: list[StoredEvent]


@dataclass(frozen=True)
class Candidate:
    """A queued job the scheduler would start, as it read it, and the events that start it."""

    job_id: str
    version: int
    attempt: int
    then: Sequence[Event]


# SQL ----------------------------------------------------------------------------------------

_QUEUED_JOB = "SELECT version FROM jobs WHERE id = :id AND state = :queued"
_SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
_LEASE = "SELECT executor, attempt, lease_until FROM leases WHERE job_id = :job_id"
_UPSERT_LEASE = (
    "INSERT INTO leases (job_id, executor, attempt, lease_until) "
    "VALUES (:job_id, :executor, :attempt, :lease_until) "
    "ON CONFLICT (job_id) DO UPDATE SET executor = excluded.executor, "
    "attempt = excluded.attempt, lease_until = excluded.lease_until"
)
_RENEW = (
    "UPDATE leases SET lease_until = :lease_until WHERE job_id = :job_id "
    "AND executor = :executor AND attempt = :attempt AND lease_until >= :now"
)
_LOST = (
    "SELECT j.id FROM jobs j LEFT JOIN leases l ON l.job_id = j.id "
    "WHERE j.state = :running AND (l.job_id IS NULL OR l.attempt != j.attempt "
    "OR l.lease_until < :now OR l.executor = :mine)"
)


def _postgres(conn: Any) -> bool:
    return getattr(conn, "backend", None) == "postgresql"


def _serialise(conn: Any) -> None:
    """Take the lock every append takes (PostgreSQL's append advisory lock; on SQLite the
    write transaction holds it already), first, so lease work and appends never wait on
    each other in opposite orders."""
    if _postgres(conn):
        from dropkiln.store.postgres import APPEND_LOCK

        conn.execute(f"SELECT pg_advisory_xact_lock({APPEND_LOCK})")


def store_clock(conn: Any) -> float:
    """Now, in seconds since the epoch, by the store's clock."""
    if _postgres(conn):
        return float(conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
    return time.time()


def _held(conn: Any, fence: Fence, now: float) -> bool:
    row = conn.execute(_LEASE, {"job_id": fence.job_id}).fetchone()
    return (
        row is not None
        and row[0] == fence.executor
        and int(row[1]) == fence.attempt
        and float(row[2]) >= now
    )


def _pending(events: Sequence[Event]) -> list[tuple[str, dict[str, Any]]]:
    return [(event.type_name(), event.model_dump(mode="json")) for event in events]


# Claims ---------------------------------------------------------------------------------------


async def claim(
    store: EventStore,
    candidates: Sequence[Candidate],
    executor: str,
    lease_s: float,
) -> Claim | None:
    """Claim the first candidate still queued at the version read and not being claimed by
    another transaction; None when every one was taken or changed meanwhile."""
    work = functools.partial(_claim, store, list(candidates), executor, lease_s, os.getpid())
    return await store.transaction(work)


def _claim(
    store: EventStore,
    candidates: list[Candidate],
    executor: str,
    lease_s: float,
    pid: int,
    conn: Any,
) -> Claim | None:
    _serialise(conn)
    select = _QUEUED_JOB + (_SKIP_LOCKED if _postgres(conn) else "")
    for candidate in candidates:
        row = conn.execute(select, {"id": candidate.job_id, "queued": JobState.QUEUED}).fetchone()
        if row is None or int(row[0]) != candidate.version:
            continue  # claimed, cancelled or changed since it was read
        fence = Fence(candidate.job_id, executor, candidate.attempt)
        lease_until = store_clock(conn) + lease_s
        conn.execute(_UPSERT_LEASE, {**_lease_row(fence), "lease_until": lease_until})
        claimed = JobClaimed(
            executor=executor, attempt=candidate.attempt, lease_until=lease_until, pid=pid
        )
        stream = job_stream(candidate.job_id)
        stored = store.database.append(
            [(stream, _pending([claimed, *candidate.then]))], {stream: candidate.version}, conn
        )
        return Claim(fence, lease_until, stored)
    return None


def _lease_row(fence: Fence) -> dict[str, Any]:
    return {"job_id": fence.job_id, "executor": fence.executor, "attempt": fence.attempt}


async def renew(store: EventStore, fence: Fence, lease_s: float) -> float | None:
    """Extend the lease by ``lease_s`` from now; None when it is lost (it ran out, or the
    job was claimed again): the attempt must stop and write nothing more."""

    def work(conn: Any) -> float | None:
        _serialise(conn)
        now = store_clock(conn)
        params = {**_lease_row(fence), "lease_until": now + lease_s, "now": now}
        return now + lease_s if conn.execute(_RENEW, params).rowcount == 1 else None

    return await store.transaction(work)


# Fenced writes ----------------------------------------------------------------------------


async def append_fenced(store: EventStore, fence: Fence, events: Sequence[Event]) -> None:
    """Append an attempt's events to its job, only while its lease holds (else LeaseLost)."""
    pending = [(job_stream(fence.job_id), _pending(events))]

    def work(conn: Any) -> list[StoredEvent]:
        _serialise(conn)
        if not _held(conn, fence, store_clock(conn)):
            raise LeaseLost(
                f"job {fence.job_id}: attempt {fence.attempt} of {fence.executor} lost its "
                "lease; its write was refused"
            )
        stored: list[StoredEvent] = store.database.append(pending, {}, conn)
        return stored

    await store.transaction(work, durable=any(event.durable for event in events))


async def queued_jobs(store: EventStore, limit: int) -> list[tuple[str, int, int]]:
    """(id, version, attempt) of the first ``limit`` queued jobs in scheduling order
    (priority, then submission), dependencies not considered: what a claim loop reads."""
    sql = (
        "SELECT id, version, attempt FROM jobs WHERE state = :queued "
        "ORDER BY priority DESC, submitted_seq LIMIT :limit"
    )

    def work(conn: Any) -> list[tuple[str, int, int]]:
        rows = conn.execute(sql, {"queued": JobState.QUEUED, "limit": limit})
        return [(str(row[0]), int(row[1]), int(row[2])) for row in rows]

    return await store.snapshot(work)


# Lost leases --------------------------------------------------------------------------------


async def lost_leases(store: EventStore, mine: str | None = None) -> list[str]:
    """Running jobs whose attempt has no live lease: it ran out, it is missing (written
    before leases, or by a daemon that never took one), or it is ``mine``, an executor id
    whose previous process is known dead."""

    def work(conn: Any) -> list[str]:
        now = store_clock(conn)
        params = {"running": JobState.RUNNING, "now": now, "mine": mine or ""}
        return [str(row[0]) for row in conn.execute(_LOST, params)]

    return await store.snapshot(work)


async def requeue_lost(
    store: EventStore,
    job_id: str,
    version: int,
    attempt: int,
    then: Sequence[Event],
    mine: str | None = None,
) -> bool:
    """Append ``then`` (JobInterrupted and a requeue or an ending) to a running job whose
    lease is lost, checked again in the write transaction with the version read; False when
    the lease turned out live (renewed meanwhile). ConcurrencyError if the job changed."""

    def work(conn: Any) -> bool:
        _serialise(conn)
        row = conn.execute(_LEASE, {"job_id": job_id}).fetchone()
        live = (
            row is not None
            and int(row[1]) == attempt
            and float(row[2]) >= store_clock(conn)
            and row[0] != mine
        )
        if live:
            return False
        stream = job_stream(job_id)
        store.database.append([(stream, _pending(then))], {stream: version}, conn)
        return True

    return await store.transaction(work)


__all__ = [
    "Candidate",
    "Claim",
    "ConcurrencyError",
    "Fence",
    "LeaseLost",
    "append_fenced",
    "claim",
    "executor_id",
    "lost_leases",
    "queued_jobs",
    "renew",
    "requeue_lost",
    "store_clock",
]
