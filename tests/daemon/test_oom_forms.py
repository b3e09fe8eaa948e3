"""Defect 6 through the daemon: each real form of an out-of-memory error moves the job one
rung down and it resumes, instead of failing it."""

from __future__ import annotations

import pytest

from dropkiln.config import Settings
from dropkiln.stages.faults import OOM_FORMS
from tests.daemon.harness import ended, running_daemon, submit, types_of, use_step_stages, wait_job


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


@pytest.mark.parametrize("kind", sorted(OOM_FORMS))
async def test_defect6_every_oom_form_steps_down_a_rung(settings: Settings, kind: str) -> None:
    settings.faults = f"{kind}@steps.step:2"
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "m1", steps=3)
        job = await wait_job(daemon.store, "m1", ended)
        assert job.state == "succeeded", job.error
        assert job.result is not None and job.result["rung"] == 1
        types = await types_of(daemon.store, "m1")
        assert types.count("OutOfMemory") == 1 and types.count("RetryScheduled") == 1
