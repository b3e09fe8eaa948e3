"""A retry requeues every job that failed only because the retried job did, however far
down the chain (dataset → LoRA → images → video)."""

from __future__ import annotations

import anyio
import pytest

from dropkiln.config import Settings
from dropkiln.store import find_job
from dropkiln.store.events import QueuePaused, QueueResumed, RetryRequested, job_stream
from tests.daemon.harness import (
    ended,
    running_daemon,
    submit,
    types_of,
    use_step_stages,
    wait_job,
)


@pytest.fixture(autouse=True)
def _step_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


async def test_retry_requeues_the_whole_chain_that_failed_with_it(settings: Settings) -> None:
    settings.faults = "enospc@steps.step:1"
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "first", steps=1)
        await submit(store, "second", depends_on=["first"], steps=1)
        await submit(store, "third", stage="cpusteps", depends_on=["second"], steps=1)
        await submit(store, "other", steps=1, fail_with="a failure of its own")
        await submit(store, "after-other", depends_on=["other"], steps=1)
        for job in ("first", "second", "third", "other", "after-other"):
            assert (await wait_job(store, job, ended)).state == "failed"
        await store.append(job_stream("first"), [RetryRequested(by="test")])
        for job in ("first", "second", "third"):
            await wait_job(store, job, lambda j: j.state == "succeeded")
        assert (await wait_job(store, "after-other", ended)).state == "failed"


async def test_a_failure_that_only_mentions_the_retried_job_is_not_requeued(
    settings: Settings,
) -> None:
    # "below" failed because "other" did; other's own error text names job "first". A retry
    # of "first" must leave "below" alone: what ended it is recorded, not guessed from text.
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "other", steps=1, fail_with="could not read job first 's captions")
        assert (await wait_job(store, "other", ended)).state == "failed"
        await store.append("daemon", [QueuePaused(by="test")])
        with anyio.fail_after(5):
            while not daemon.scheduler.paused:
                await anyio.sleep(0.02)
        await submit(store, "first", steps=1, fail_with="a failure of its own")
        await submit(store, "below", stage="cpusteps", depends_on=["first", "other"], steps=1)
        below = await wait_job(store, "below", ended)
        assert below.state == "failed" and below.error is not None and "job first " in below.error
        await store.append("daemon", [QueueResumed(by="test")])
        assert (await wait_job(store, "first", ended)).state == "failed"
        await store.append(job_stream("first"), [RetryRequested(by="test")])
        await wait_job(store, "first", lambda j: j.attempt == 2 and j.terminal)
        await wait_job(store, "below", ended)
        assert "JobQueued" not in await types_of(store, "below")
        assert (await find_job(store, "below")).state == "failed"
