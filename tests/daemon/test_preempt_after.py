"""Defect 5 (scheduler half): ``preempt_after_s`` is read, and means what the README says:
the least time a running GPU job keeps the GPU before a higher-priority job preempts it."""

from __future__ import annotations

import datetime

import pytest

from dropkiln.config import Settings
from dropkiln.store.events import job_stream
from tests.daemon.harness import ended, running_daemon, submit, use_step_stages, wait_job


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


def _at(event: object) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(event.at))  # type: ignore[attr-defined]


@pytest.mark.parametrize("preempt_after_s", [0.0, 1.5])
async def test_defect5_preempt_after_s_is_the_least_run_before_preemption(
    settings: Settings, preempt_after_s: float
) -> None:
    settings.preempt_after_s = preempt_after_s
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await submit(store, "train", steps=200, sleep=0.02)
        await wait_job(store, "train", lambda j: j.done >= 1)
        await submit(store, "gen", stage="urgent", steps=1)
        assert (await wait_job(store, "gen", ended)).state == "succeeded"
        events = await store.read(0, stream=job_stream("train"), limit=None)
        started = _at(next(e for e in events if e.type == "JobStarted"))
        preempted = _at(next(e for e in events if e.type == "JobPreempted"))
        gen = await store.read(0, stream=job_stream("gen"), limit=None)
        submitted = _at(next(e for e in gen if e.type == "JobSubmitted"))
        assert (preempted - started).total_seconds() >= preempt_after_s
        # due at the later of the two; the scheduler looks again at least once a second
        # (a drop wakes it at once; this test's direct submit does not)
        due = max(started + datetime.timedelta(seconds=preempt_after_s), submitted)
        assert (preempted - due).total_seconds() < 1.5
        await wait_job(store, "train", ended)
