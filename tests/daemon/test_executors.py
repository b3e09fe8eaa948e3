"""Two daemons (executors) on one root, in one process: each job runs on one of them, and a
waiting urgent job makes exactly one running job give way, not one on every executor."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from dropkiln.config import Settings
from dropkiln.store import check, list_jobs
from tests.daemon.harness import ended, running_daemon, submit, types_of, use_step_stages, wait_job


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


def on(settings: Settings, device: str) -> Settings:
    return settings.model_copy(update={"device": device})


async def test_two_executors_share_the_work_and_one_gives_way_to_an_urgent_job(
    settings: Settings,
) -> None:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_daemon(on(settings, "cpu:0")))
        await stack.enter_async_context(running_daemon(on(settings, "cpu:1")))
        store = first.store
        # Steps of 1.5 s: a job asked to give way stops only after its step, so both
        # executors' scheduling passes (one a second at least) see the urgent job waiting.
        await submit(store, "slow1", steps=5, sleep=1.5)
        await submit(store, "slow2", steps=5, sleep=1.5)
        for job_id in ("slow1", "slow2"):
            await wait_job(store, job_id, lambda j: j.state == "running" and j.done >= 1)
        holders = {j.id: j.executor for j in await list_jobs(store)}
        assert holders["slow1"] != holders["slow2"], holders  # one GPU job per executor

        await submit(store, "now", stage="urgent", steps=2)
        job = await wait_job(store, "now", ended, timeout=30)
        assert job.state == "succeeded"
        preempted = [
            job_id
            for job_id in ("slow1", "slow2")
            if "JobPreempted" in await types_of(store, job_id)
        ]
        assert len(preempted) == 1, preempted
        for job_id in ("slow1", "slow2"):
            slow = await wait_job(store, job_id, ended, timeout=60)
            assert slow.state == "succeeded" and slow.result is not None
            assert slow.result["ran"] == list(range(1, 6))  # resumed, no step twice
            kinds = await types_of(store, job_id)
            assert kinds.count("JobSucceeded") == 1
            assert kinds.count("JobClaimed") == kinds.count("JobStarted")
        assert (await check(store)).ok


async def test_a_start_requeues_its_own_dead_jobs_and_leaves_live_leases_alone(
    settings: Settings,
) -> None:
    """Before leases, a starting daemon took every running job for its dead predecessor's.
    With other executors on the store, only its own (same host and device) and those whose
    lease ran out are; a job another executor holds under a live lease keeps running there."""
    from dropkiln.store.backend import open_store
    from dropkiln.store.events import JobStarted
    from dropkiln.store.leases import Candidate, claim, executor_id

    store = await open_store(settings.paths.db, settings.store_url, create=True)
    try:
        for job_id, holder in (("mine", executor_id("cpu")), ("theirs", "box-b/cuda:0")):
            await submit(store, job_id, steps=2)
            [job] = [j for j in await list_jobs(store) if j.id == job_id]
            started = [JobStarted(attempt=1, memory_rung=0)]
            assert await claim(store, [Candidate(job_id, job.version, 1, started)], holder, 600)
    finally:
        await store.close()

    async with running_daemon(on(settings, "cpu")) as daemon:
        mine = await wait_job(daemon.store, "mine", ended)
        assert mine.state == "succeeded"
        assert "JobInterrupted" in await types_of(daemon.store, "mine")
        theirs = await wait_job(daemon.store, "theirs", lambda j: True)
        assert theirs.state == "running" and theirs.executor == "box-b/cuda:0"
        assert "JobInterrupted" not in await types_of(daemon.store, "theirs")


async def test_a_job_pinned_to_a_device_class_runs_only_on_an_executor_of_that_class(
    settings: Settings,
) -> None:
    """Two executors, one of class "big": pinned jobs all run there, unpinned ones anywhere,
    and a job pinned to a class no executor serves stays queued, showing its class."""
    from dropkiln.store.leases import executor_id
    from dropkiln.store.telemetry import device_rooms

    big = settings.executor.model_copy(update={"device_class": "big"})
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_daemon(on(settings, "cpu:0")))
        await stack.enter_async_context(
            running_daemon(settings.model_copy(update={"device": "cpu:1", "executor": big}))
        )
        store = first.store
        await submit(store, "nowhere", device_class="a100", steps=1)
        for n in range(4):
            await submit(store, f"pinned{n}", device_class="big", steps=2, sleep=0.2)
            await submit(store, f"any{n}", steps=2, sleep=0.2)
        for n in range(4):
            pinned = await wait_job(store, f"pinned{n}", ended, timeout=60)
            assert pinned.state == "succeeded"
            assert pinned.executor == executor_id("cpu:1"), pinned.executor
            assert pinned.device_class == "big"
            assert (await wait_job(store, f"any{n}", ended, timeout=60)).state == "succeeded"
        anywhere = {j.executor for j in await list_jobs(store) if j.id.startswith("any")}
        assert executor_id("cpu:0") in anywhere  # the unpinned work was not all left to one
        # Each daemon's memory samples name it and its class: what steering reads.
        rooms = {r.executor: r.device_class for r in await device_rooms(store, 10.0)}
        assert rooms == {executor_id("cpu:0"): "cpu", executor_id("cpu:1"): "big"}
        nowhere = await wait_job(store, "nowhere", lambda j: True)
        assert nowhere.state == "queued" and nowhere.executor is None
        assert nowhere.summary()["device_class"] == "a100"
        assert (await check(store)).ok
