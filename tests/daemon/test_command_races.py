"""Commands against a moving job: a cancel is never lost and a job never ends twice."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dropkiln.config import Settings
from dropkiln.daemon import executor as executor_module
from dropkiln.daemon import scheduler as scheduler_module
from dropkiln.store import EventStore, check
from dropkiln.store.events import CancelRequested, JobStarted, job_stream
from tests.daemon.harness import ended, running_daemon, submit, types_of, use_step_stages, wait_job

TERMINAL = ("JobSucceeded", "JobFailed", "JobCancelled")


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


def assert_ended_once(types: list[str], how: str) -> None:
    ends = [t for t in types if t in TERMINAL]
    assert ends == [how], types
    after_end = types[types.index(how) + 1 :]
    assert "JobStarted" not in after_end and "JobProgress" not in after_end, types


async def test_defect02_cancel_written_while_the_daemon_was_dead_is_obeyed(
    settings: Settings,
) -> None:
    # What a kill -9 leaves: the job was started, then a cancel came while nobody listened.
    async with await EventStore.open(settings.paths.db, create=True) as store:
        await submit(store, "c1", steps=3)
        await store.append(job_stream("c1"), [JobStarted(attempt=1, memory_rung=0)])
        await store.append(job_stream("c1"), [CancelRequested(by="cli")])
    async with running_daemon(settings) as daemon:
        job = await wait_job(daemon.store, "c1", ended)
        assert job.state == "cancelled"
        types = await types_of(daemon.store, "c1")
        assert types.count("JobStarted") == 1, types
        assert_ended_once(types, "JobCancelled")
        assert (await check(daemon.store)).ok


async def test_defect03_cancel_while_the_job_is_being_started_ends_it_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start side widened: JobStarted is written a second after the job was read."""
    reading = anyio.Event()
    real = executor_module.remembered_rung

    async def slow_remembered_rung(store: Any, key: str) -> int:
        if key == "slow":
            reading.set()
            await anyio.sleep(1.0)
        return await real(store, key)

    monkeypatch.setattr(executor_module, "remembered_rung", slow_remembered_rung)
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "r1", steps=5, sleep=0.05, rung_key="slow")
        with anyio.fail_after(10):
            await reading.wait()
        await daemon.store.append(job_stream("r1"), [CancelRequested(by="test")])
        job = await wait_job(daemon.store, "r1", ended)
        await anyio.sleep(1.5)  # long enough for a wrongly started attempt to finish
        assert job.state == "cancelled"
        assert_ended_once(await types_of(daemon.store, "r1"), "JobCancelled")
        assert (await check(daemon.store)).ok


async def test_defect03_job_started_while_its_cancel_is_deciding_ends_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel side widened: the job starts between the cancel's read and its write."""
    real = scheduler_module.find_job

    async def slow_find_job(store: Any, ref: str) -> Any:
        job = await real(store, ref)
        if ref == "late":
            await anyio.sleep(1.0)
        return job

    monkeypatch.setattr(scheduler_module, "find_job", slow_find_job)
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "first", steps=3, sleep=0.1)
        await submit(store, "late", depends_on=["first"], steps=30, sleep=0.05)
        await wait_job(store, "first", lambda j: j.state == "running")
        await store.append(job_stream("late"), [CancelRequested(by="test")])
        job = await wait_job(store, "late", lambda j: j.terminal, timeout=30)
        await anyio.sleep(2.0)
        assert job.state == "cancelled"
        assert_ended_once(await types_of(store, "late"), "JobCancelled")
        assert (await check(store)).ok
