"""Claims, leases and fencing between executors that share one store (both backends).

The rules, in the words of the job queues built on PostgreSQL (procrastinate, Oban,
graphile-worker): a job is fetched by exactly one worker even when several ask at once; a
worker that stops heart-beating loses its job to another, which runs it again; and a
worker that comes back after losing it must not be able to record anything for it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import pytest

from dropkiln.store import ConcurrencyError, EventStore, check, find_job, list_jobs
from dropkiln.store import events as ev
from dropkiln.store.events import job_stream
from dropkiln.store.leases import (
    Candidate,
    LeaseLost,
    append_fenced,
    claim,
    executor_id,
    lost_leases,
    renew,
    requeue_lost,
)

from .builders import submitted

A = executor_id("cuda:0", host="box-a")
B = executor_id("cuda:1", host="box-b")


async def queued(store: EventStore, job_id: str = "j") -> Candidate:
    """A queued job as a scheduler reads it, and the JobStarted that starts its attempt."""
    await store.append(job_stream(job_id), [submitted(job_id), ev.JobQueued()])
    job = await find_job(store, job_id)
    return next_attempt(job.id, job.version, job.attempt)


def next_attempt(job_id: str, version: int, attempt: int) -> Candidate:
    started = ev.JobStarted(attempt=attempt + 1, memory_rung=0)
    return Candidate(job_id, version, attempt + 1, [started])


async def types_of(store: EventStore, job_id: str = "j") -> list[str]:
    return [e.type for e in await store.read(stream=job_stream(job_id))]


async def test_a_claim_records_the_executor_and_starts_the_attempt(store: EventStore) -> None:
    got = await claim(store, [await queued(store)], A, lease_s=30)
    assert got is not None
    assert (got.fence.executor, got.fence.attempt) == (A, 1)
    assert await types_of(store) == ["JobSubmitted", "JobQueued", "JobClaimed", "JobStarted"]
    job = await find_job(store, "j")
    assert (job.state, job.attempt, job.executor) == ("running", 1, A)
    report = await check(store, files=False)
    assert report.ok, (report.violations, report.differences)


async def test_status_json_names_the_executor_running_each_job(store: EventStore) -> None:
    """With several daemons, ``status --json`` (and ``GET /v1/jobs``) says which one runs a
    job, as procrastinate's and Oban's job listings name the worker."""
    from dropkiln.store.queries import status_report

    await claim(store, [await queued(store)], A, lease_s=30)
    await queued(store, "waiting")
    jobs = {job["id"]: job for job in (await status_report(store))["jobs"]}
    assert (jobs["j"]["executor"], jobs["waiting"]["executor"]) == (A, None)


async def test_only_one_of_several_claims_of_one_job_wins(store: EventStore) -> None:
    candidate = await queued(store)
    results: list[object] = []

    async def one(executor: str) -> None:
        results.append(await claim(store, [candidate], executor, lease_s=30))

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(one, executor_id(f"cuda:{n}", host="box"))
    assert sum(result is not None for result in results) == 1
    assert (await types_of(store)).count("JobClaimed") == 1


async def test_a_claim_skips_jobs_taken_or_changed_and_takes_the_next(store: EventStore) -> None:
    first, second = await queued(store, "first"), await queued(store, "second")
    assert await claim(store, [first], A, lease_s=30) is not None
    got = await claim(store, [first, second], B, lease_s=30)
    assert got is not None and got.fence.job_id == "second"


async def test_a_paused_executors_late_write_is_refused(store: EventStore) -> None:
    """A is paused (SIGSTOP) past its lease; B requeues and claims the job; A wakes and
    tries to record progress, an artifact and the job's ending: every write is refused,
    and B's attempt goes on as if A never came back."""
    a = await claim(store, [await queued(store)], A, lease_s=0.2)
    assert a is not None
    await append_fenced(store, a.fence, [ev.JobProgress(done=1, total=4)])
    await anyio.sleep(0.3)  # A is stopped: no heartbeat

    assert await lost_leases(store) == ["j"]
    job = await find_job(store, "j")
    requeue = [ev.JobInterrupted(previous_attempt=1), ev.JobQueued(reason="lease expired")]
    assert await requeue_lost(store, job.id, job.version, job.attempt, requeue)
    job = await find_job(store, "j")
    b = await claim(store, [next_attempt(job.id, job.version, job.attempt)], B, lease_s=30)
    assert b is not None and b.fence.attempt == 2
    before = await types_of(store)

    for late in (
        [ev.JobProgress(done=2, total=4)],
        [ev.ArtifactWritten(path="outputs/x.png", kind="image")],
        [ev.JobSucceeded()],
    ):
        with pytest.raises(LeaseLost):
            await append_fenced(store, a.fence, late)
    assert await renew(store, a.fence, 30) is None
    assert await types_of(store) == before

    await append_fenced(store, b.fence, [ev.JobProgress(done=3, total=4), ev.JobSucceeded()])
    job = await find_job(store, "j")
    assert (job.state, job.attempt, job.executor) == ("succeeded", 2, B)
    report = await check(store, files=False)
    assert report.ok, (report.violations, report.differences)


async def test_an_expired_lease_refuses_writes_before_anyone_claims_again(
    store: EventStore,
) -> None:
    a = await claim(store, [await queued(store)], A, lease_s=0.1)
    assert a is not None
    await anyio.sleep(0.2)
    with pytest.raises(LeaseLost):
        await append_fenced(store, a.fence, [ev.JobSucceeded()])
    assert await renew(store, a.fence, 30) is None


async def test_heartbeats_keep_the_lease_and_the_job(store: EventStore) -> None:
    a = await claim(store, [await queued(store)], A, lease_s=1.5)
    assert a is not None
    for _ in range(4):  # 2 s in all: past the first lease, kept by the renewals
        await anyio.sleep(0.5)
        assert await renew(store, a.fence, 1.5) is not None
    assert await lost_leases(store) == []
    job = await find_job(store, "j")
    requeue = [ev.JobInterrupted(previous_attempt=1), ev.JobQueued()]
    assert not await requeue_lost(store, job.id, job.version, job.attempt, requeue)
    await append_fenced(store, a.fence, [ev.JobSucceeded()])


async def test_a_requeue_on_a_stale_read_is_refused(store: EventStore) -> None:
    """Two executors find the same lost lease: one requeues it, the other's version is old."""
    a = await claim(store, [await queued(store)], A, lease_s=0.05)
    assert a is not None
    await anyio.sleep(0.1)
    job = await find_job(store, "j")
    requeue = [ev.JobInterrupted(previous_attempt=1), ev.JobQueued()]
    assert await requeue_lost(store, job.id, job.version, job.attempt, requeue)
    with pytest.raises(ConcurrencyError):
        await requeue_lost(store, job.id, job.version, job.attempt, requeue)


async def test_running_jobs_without_a_lease_or_held_by_my_dead_self_are_lost(
    store: EventStore,
) -> None:
    # Written the way daemons before leases wrote it: no JobClaimed, no lease row.
    await store.append(
        job_stream("old"), [submitted("old"), ev.JobStarted(attempt=1, memory_rung=0)]
    )
    mine = await claim(store, [await queued(store, "mine")], A, lease_s=60)
    theirs = await claim(store, [await queued(store, "theirs")], B, lease_s=60)
    assert mine is not None and theirs is not None
    assert await lost_leases(store) == ["old"]
    assert sorted(await lost_leases(store, mine=A)) == ["mine", "old"]


async def test_executor_processes_claim_every_job_exactly_once(
    store: EventStore, db_path: Path, store_url: str
) -> None:
    """Three processes run the claim loop over the same head of the queue (the bench's
    claimers): each job is claimed by one of them, once."""
    from dropkiln.bench.claims import run_claimers, submit_jobs

    await submit_jobs(db_path, store_url, 24)
    run = await anyio.to_thread.run_sync(run_claimers, db_path, store_url, 3, 24)
    assert len(run["latencies"]) == 24
    claims = await store.read(types=["JobClaimed"], limit=None)
    assert sorted(e.stream for e in claims) == sorted(job_stream(f"c{n}") for n in range(24))
    assert {j.state for j in await list_jobs(store)} == {"running"}


async def test_a_writer_stopped_inside_its_transaction_does_not_stall_the_others(
    db_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: an executor paused in the middle of a write holds the append lock; the
    server ends its session once it has been idle in the transaction too long, so the other
    executors' writes (a requeue of the paused one's job, among them) go through. When the
    paused one runs again its write, rolled back, is made again on a new connection, after
    theirs, deciding again on what it reads then (a fenced write finds its lease gone)."""
    from dropkiln.store import postgres
    from dropkiln.store.backend import open_store

    monkeypatch.setattr(postgres, "STALLED_WRITER_S", 1)
    paused = await open_store(db_path, postgres_url, create=True)
    other = await open_store(db_path, postgres_url)
    stopped = threading.Event()
    try:

        def stop_inside(conn: object) -> None:
            paused.database.append([("job:p", [("JobQueued", {"reason": "x"})])], {}, conn)
            if not stopped.is_set():
                stopped.set()
                time.sleep(4)  # SIGSTOP: the lock is held, the session idle in its transaction

        async with anyio.create_task_group() as tg:
            tg.start_soon(paused.transaction, stop_inside)
            await anyio.sleep(0.5)
            with anyio.fail_after(3):
                await other.append(job_stream("o"), [submitted("o")])
        assert [e.stream for e in await other.read()] == ["job:o", "job:p"]
    finally:
        await other.close()
        await paused.close()


async def test_executors_appending_to_one_stream_at_once_never_conflict(
    db_path: Path, store_url: str
) -> None:
    """Several daemons append to the shared ``daemon`` stream (DaemonStarted, DropWaiting…)
    and to one job's stream (the executor and a CLI command) without a version to check:
    each append goes after the others, none is refused as a conflict."""
    from dropkiln.store.backend import open_store

    stores = [await open_store(db_path, store_url, create=True) for _ in range(3)]
    try:

        async def append_many(store: EventStore) -> None:
            for _ in range(30):
                await store.append(ev.DAEMON_STREAM, [ev.DaemonStopping(reason="x")])

        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(append_many, store)
        versions = [e.version for e in await stores[0].read(stream=ev.DAEMON_STREAM, limit=None)]
        assert versions == list(range(1, 91))
    finally:
        for store in stores:
            await store.close()
