"""The daemon's job machinery: lanes, priorities, the memory ladder, commands, preemption."""

from __future__ import annotations

import pytest

from dropkiln.config import Settings
from dropkiln.store import check, find_job, remembered_rung
from dropkiln.store.events import (
    CancelRequested,
    QueuePaused,
    QueueResumed,
    RetryRequested,
    job_stream,
)
from tests.daemon.harness import (
    ended,
    running_daemon,
    submit,
    types_of,
    use_step_stages,
    wait_job,
)


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


# On PostgreSQL by default; the rest of this module there too with --full.
QUICK_ON_POSTGRES = {
    "test_job_runs_once_and_records_its_lifecycle",
    "test_out_of_memory_steps_down_and_resumes_from_checkpoint",
    "test_cancel_stops_a_running_job_and_a_queued_one_never_starts",
    "test_dependencies_order_jobs_and_a_retry_requeues_dependents",
}


@pytest.fixture(params=["sqlite", "postgres"])
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The daemon's machinery on each event store: the root's SQLite file, or PostgreSQL."""
    if request.param == "postgres":
        quick = request.function.__name__ in QUICK_ON_POSTGRES
        if not quick and not request.config.getoption("--full"):
            pytest.skip("long form on PostgreSQL: run with --full")
        settings.store_url = str(request.getfixturevalue("postgres_url"))
    return settings


async def test_job_runs_once_and_records_its_lifecycle(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "a1", steps=3)
        job = await wait_job(daemon.store, "a1", ended)
        assert job.state == "succeeded"
        assert job.result == {"ran": [1, 2, 3], "rung": 0, "upstream": None}
        types = await types_of(daemon.store, "a1")
        assert types[:3] == ["JobSubmitted", "JobClaimed", "JobStarted"]
        assert job.executor is not None and job.executor.endswith("/cpu")
        assert types.count("CheckpointSaved") == 3
        assert types[-2:] == ["ArtifactWritten", "JobSucceeded"]
        assert (await check(daemon.store)).ok


async def test_out_of_memory_steps_down_and_resumes_from_checkpoint(settings: Settings) -> None:
    settings.faults = "oom@steps.step:3"
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "m1", steps=5, rung_key="steps:tiny:64")
        job = await wait_job(daemon.store, "m1", ended)
        assert job.state == "succeeded"
        # Steps 1-2 ran at rung 0, the OOM hit step 3, the retry resumed at step 3.
        assert job.result == {"ran": [1, 2, 3, 4, 5], "rung": 1, "upstream": None}
        events = await daemon.store.read(0, stream=job_stream("m1"), limit=None)
        oom = next(e for e in events if e.type == "OutOfMemory")
        assert oom.data["rung_name"] == "default"
        assert oom.data["snapshot"]["total"] > 0
        retry = next(e for e in events if e.type == "RetryScheduled")
        assert retry.data["next_rung"] == 1
        assert retry.data["resume_from"]["step"] == 2
        # The rung that worked is remembered for the next job with the same key.
        assert await remembered_rung(daemon.store, "steps:tiny:64") == 1
        await submit(daemon.store, "m2", steps=1, rung_key="steps:tiny:64")
        second = await wait_job(daemon.store, "m2", ended)
        assert second.result is not None and second.result["rung"] == 1


async def test_out_of_memory_on_every_rung_fails_with_what_was_tried(settings: Settings) -> None:
    settings.faults = "oom@steps.step"
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "m3", steps=2)
        job = await wait_job(daemon.store, "m3", ended)
        assert job.state == "failed"
        assert job.error is not None
        assert "tried: default, lighter, lightest" in job.error
        assert (await types_of(daemon.store, "m3")).count("OutOfMemory") == 3


async def test_stage_error_fails_the_job_and_the_daemon_goes_on(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "f1", steps=2, fail_with="broken input")
        await submit(daemon.store, "ok", steps=1)
        failed = await wait_job(daemon.store, "f1", ended)
        assert failed.state == "failed"
        assert failed.error == "ValueError: broken input"
        assert (await wait_job(daemon.store, "ok", ended)).state == "succeeded"


async def test_cancel_stops_a_running_job_and_a_queued_one_never_starts(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "long", steps=200, sleep=0.02)
        await submit(store, "next", steps=1)
        await wait_job(store, "long", lambda j: j.done >= 2)
        await store.append(job_stream("next"), [CancelRequested(by="test")])
        await store.append(job_stream("long"), [CancelRequested(by="test")])
        assert (await wait_job(store, "long", ended)).state == "cancelled"
        assert (await wait_job(store, "next", ended)).state == "cancelled"
        assert "JobStarted" not in await types_of(store, "next")


async def test_dependencies_order_jobs_and_a_retry_requeues_dependents(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "up", steps=1, fail_with="first try fails")
        await submit(store, "down", depends_on=["up"], steps=1, needs="steps")
        assert (await wait_job(store, "down", ended)).state == "failed"
        down = await find_job(store, "down")
        assert down.error is not None and "dependency steps job up failed" in down.error
        assert "JobStarted" not in await types_of(store, "down")


async def test_retry_requeues_a_failed_job_with_its_dependents(settings: Settings) -> None:
    settings.faults = "oom@steps.step:1,oom@steps.step:2,oom@steps.step:3"
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "up", steps=1)
        await submit(store, "down", stage="cpusteps", depends_on=["up"], steps=1, needs="steps")
        assert (await wait_job(store, "up", ended)).state == "failed"
        assert (await wait_job(store, "down", ended)).state == "failed"
        await store.append(job_stream("up"), [RetryRequested(by="test")])
        up = await wait_job(store, "up", lambda j: j.state == "succeeded")
        assert up.attempt == 4
        down = await wait_job(store, "down", lambda j: j.state == "succeeded")
        assert down.result is not None
        assert down.result["upstream"]["ran"] == [1]


async def test_pause_holds_new_work_until_resume(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await store.append("daemon", [QueuePaused(by="test")])
        await wait_until_paused(daemon)
        await submit(store, "held", steps=1)
        import anyio

        await anyio.sleep(1.2)
        assert (await find_job(store, "held")).state == "queued"
        await store.append("daemon", [QueueResumed(by="test")])
        assert (await wait_job(store, "held", ended)).state == "succeeded"


async def wait_until_paused(daemon: object) -> None:
    import anyio

    with anyio.fail_after(5):
        while not daemon.scheduler.paused:  # type: ignore[attr-defined]
            await anyio.sleep(0.02)


async def test_cpu_lane_does_not_wait_behind_the_gpu(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "gpu", steps=300, sleep=0.03)
        await wait_job(store, "gpu", lambda j: j.state == "running")
        await submit(store, "cpu", stage="cpusteps", steps=2)
        assert (await wait_job(store, "cpu", ended)).state == "succeeded"
        assert (await find_job(store, "gpu")).state == "running"
        await store.append(job_stream("gpu"), [CancelRequested(by="test")])
        await wait_job(store, "gpu", ended)


async def test_higher_priority_gpu_job_preempts_and_the_other_resumes(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "train", steps=150, sleep=0.03)
        await wait_job(store, "train", lambda j: j.done >= 3)
        await submit(store, "gen", stage="urgent", steps=2)
        assert (await wait_job(store, "gen", ended)).state == "succeeded"
        train = await wait_job(store, "train", ended)
        assert train.state == "succeeded"
        assert train.result is not None and train.result["ran"] == list(range(1, 151))
        types = await types_of(store, "train")
        assert "JobPreempted" in types
        gen_started = [e for e in await store.read(0, limit=None) if e.type == "JobStarted"]
        order = [e.stream for e in gen_started]
        assert order == ["job:train", "job:gen", "job:train"]


async def test_shutdown_checkpoints_requeues_and_resumes_after_restart(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "s1", steps=50, sleep=0.03)
        await wait_job(daemon.store, "s1", lambda j: j.done >= 3)
    async with running_daemon(settings) as daemon:
        stopped = await daemon.store.last("daemon", types=("DaemonStopped",))
        assert stopped[0].data["requeued"] == ["s1"]
        job = await wait_job(daemon.store, "s1", ended)
        assert job.state == "succeeded"
        assert job.result is not None and job.result["ran"] == list(range(1, 51))
        assert "JobPreempted" in await types_of(daemon.store, "s1")


async def test_a_second_daemon_on_the_same_root_and_device_refuses(settings: Settings) -> None:
    from dropkiln.daemon.lock import AlreadyRunning, DaemonLock, ExecutorLock, device_lock_path

    async with running_daemon(settings):
        # store rebuild and copy need every daemon stopped
        with pytest.raises(AlreadyRunning, match="already running"):
            DaemonLock(settings.paths.lock).acquire()
        same_device = device_lock_path(settings.paths.state, "cpu")
        with pytest.raises(AlreadyRunning, match="already running"):
            ExecutorLock(settings.paths.lock, same_device).acquire()
        # another device beside it is welcome
        with ExecutorLock(settings.paths.lock, device_lock_path(settings.paths.state, "cpu:1")):
            pass
