"""A retry requeues every job that failed only because the retried job did, however far
down the chain (dataset → LoRA → images → video)."""

from __future__ import annotations

import pytest

from dropkiln.config import Settings
from dropkiln.store.events import RetryRequested, job_stream
from tests.daemon.harness import ended, running_daemon, submit, use_step_stages, wait_job


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
