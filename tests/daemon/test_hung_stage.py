"""Defect 13: a hung stage can hold up neither a shutdown (past ``stop_timeout_s``) nor the
watchdog's view of the daemon (past ``stall_after_s``)."""

from __future__ import annotations

import time

import anyio
import pytest

from dropkiln.config import Settings
from tests.daemon.harness import ended, running_daemon, submit, types_of, use_step_stages, wait_job

HANG_S = 3.0


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


async def test_defect13_a_hung_stage_cannot_hold_a_shutdown_past_stop_timeout_s(
    settings: Settings,
) -> None:
    settings.stop_timeout_s = 0.5
    settings.stall_after_s = 0.3
    async with running_daemon(settings) as daemon:
        await submit(daemon.store, "h1", steps=3, hang_at=2, hang=HANG_S)
        await wait_job(daemon.store, "h1", lambda j: j.done >= 1)
        await anyio.sleep(0.5)  # into the hang, past stall_after_s
        assert daemon._hung() is not None and "steps job h1" in str(daemon._hung())
        stopping = time.monotonic()
    took = time.monotonic() - stopping
    assert took < settings.stop_timeout_s + 1.5, took
    assert daemon.abandoned == ["h1"]
    await anyio.sleep(HANG_S)  # the abandoned thread wakes, sees the stop and ends
    async with running_daemon(settings) as daemon:
        stopped = await daemon.store.last("daemon", types=("DaemonStopped",))
        assert stopped[0].data["requeued"] == ["h1"]
        job = await wait_job(daemon.store, "h1", ended)
        assert job.state == "succeeded"
        assert job.result is not None and job.result["ran"] == [1, 2, 3]
        assert "JobInterrupted" in await types_of(daemon.store, "h1")
