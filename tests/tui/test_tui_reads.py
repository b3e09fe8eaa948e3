"""The dashboard's reads against the history store: bounded, and right."""

from __future__ import annotations

from pathlib import Path

from dropkiln.store import EventStore
from dropkiln.store.events import JobProgress, JobSubmitted, job_stream
from dropkiln.tui.reads import LogFilter, read_jobs, read_log, read_overview, refresh_jobs

from .history import GENERATE_FAILED, NOW, T0, TRAIN


async def test_overview_reads_daemon_queue_and_memory_window(history_db: Path) -> None:
    async with await EventStore.open(history_db) as store:
        overview = await read_overview(store)
    daemon = overview.daemon
    assert (daemon.last_event, daemon.pid, daemon.device, daemon.root) == (
        "DaemonStarted", 4242, "cpu", "/srv/dk",
    )  # fmt: skip
    assert daemon.seen_ago(NOW) == 2.0 and daemon.running(NOW)
    assert not daemon.running(NOW + 60)
    assert not overview.paused
    assert len(overview.memory) == 120 and overview.memory[0].at == T0 + 481
    assert overview.running_rung == "gradient_checkpointing"


async def test_log_window_is_the_newest_events_oldest_first(history_db: Path) -> None:
    async with await EventStore.open(history_db) as store:
        window = await read_log(store, LogFilter(), limit=5)
        last_seq = await store.last_seq()
        failures = await read_log(store, LogFilter(GENERATE_FAILED, ("OutOfMemory", "JobFailed")))
    assert [e.seq for e in window] == list(range(last_seq - 4, last_seq + 1))
    assert [e.type for e in failures] == ["OutOfMemory", "OutOfMemory", "JobFailed"]


async def test_refresh_reads_only_the_touched_job_unless_jobs_appear(history_db: Path) -> None:
    async with await EventStore.open(history_db) as store:
        jobs = await read_jobs(store)
        stored = await store.append(job_stream(TRAIN), [JobProgress(done=700, total=2000)])
        refreshed = await refresh_jobs(store, jobs, stored)
        assert [j.done for j in refreshed if j.id == TRAIN] == [700]
        assert all(new is old for new, old in zip(refreshed, jobs, strict=True) if old.id != TRAIN)
        new_job = JobSubmitted(job_id="n1", stage="bucket", name="new", lane="cpu", priority=1,
                               spec={})  # fmt: skip
        stored = await store.append(job_stream("n1"), [new_job])
        refreshed = await refresh_jobs(store, refreshed, stored)
    assert refreshed[0].id == "n1" and len(refreshed) == len(jobs) + 1
