"""The scheduler runs when something may start, not on a short clock: an idle daemon does
nothing between its lease checks, yet a job another process submits starts at once."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import anyio
import pytest

from dropkiln.config import ExecutorSettings, Settings
from dropkiln.store.events import job_stream
from tests.daemon.harness import running_daemon, use_step_stages
from tests.daemon.stepstage import STAGES


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


# Another process (a second daemon's intake, the API) submits jobs one after another, each
# once the one before has ended.
SUBMITTER = """
import json, sys
from pathlib import Path

import anyio

from dropkiln.store import EventStore, find_job
from dropkiln.store.events import JobSubmitted, job_stream


async def main(db: str, count: int, spec: dict) -> None:
    store = await EventStore.open(Path(db))
    try:
        for number in range(count):
            job_id = f"other{number}"
            submitted = JobSubmitted(
                job_id=job_id, stage="steps", name=job_id, lane="gpu", priority=0, spec=spec
            )
            await store.append(job_stream(job_id), [submitted])
            with anyio.fail_after(30):
                while not (await find_job(store, job_id)).terminal:
                    await anyio.sleep(0.02)
    finally:
        await store.close()


anyio.run(main, sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
"""


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@pytest.mark.slow
async def test_a_job_another_process_submits_starts_at_once_though_passes_are_100_s_apart(
    settings: Settings,
) -> None:
    # Issue 16: the scheduler looked at the store every second, also while idle, because it
    # had no other way to see a job another process wrote. Now the daemon's tail wakes it
    # for such events, and the pass on the clock is only for leases that run out (a third
    # of lease_seconds: 100 s here). Each job is claimed well within a second of its
    # submission; with the old 1 s pass each waited 0.7 to 1.0 s (the submitter writes the
    # next job just after the pass that followed the previous one's end).
    settings = settings.model_copy(
        update={"executor": ExecutorSettings(lease_seconds=300, heartbeat_seconds=5)}
    )
    count = 6
    spec = STAGES["steps"].spec.model_validate({"steps": 1}).model_dump()
    async with running_daemon(settings) as daemon:
        assert daemon.scheduler.pass_every_s == 100
        await anyio.sleep(0.5)  # past the start-up passes
        command = [sys.executable, "-c", SUBMITTER, str(settings.paths.db), str(count)]
        with anyio.fail_after(120):
            done = await anyio.run_process([*command, json.dumps(spec)], check=False)
        assert done.returncode == 0, done.stderr.decode()
        delays = []
        for number in range(count):
            events = await daemon.store.read(0, stream=job_stream(f"other{number}"), limit=None)
            at = {e.type: _at(e.at) for e in events}
            assert "JobSucceeded" in at
            delays.append(at["JobClaimed"] - at["JobSubmitted"])
    print("submitted to claimed (ms):", [round(d * 1000) for d in delays])
    assert max(delays) < 0.5, delays


async def test_an_idle_daemon_leaves_its_event_loop_asleep(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 16: with nothing to do, the daemon's loop still woke for a scheduling pass every
    # second (each a few thread hops: jobs, leases, unmoved drops) and for the drop mover
    # twice a second: about 70 times in 5 s. Apart from the heartbeat (a telemetry sample
    # every 2.5 s; put off here) only the watcher's look every 5 s remains. Counted: the
    # loop's returns from its selector.
    import asyncio

    from dropkiln.daemon import service

    monkeypatch.setattr(service, "IDLE_TELEMETRY_S", 3600.0)
    async with running_daemon(settings) as daemon:
        await anyio.sleep(1.0)  # past the start-up work
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        real_select = selector.select
        wakes = [0]

        def counting_select(timeout: float | None = None) -> object:
            wakes[0] += 1
            return real_select(timeout)

        selector.select = counting_select
        try:
            await anyio.sleep(5.0)
        finally:
            selector.select = real_select
        assert not daemon.scheduler.running
    print(f"an idle daemon's loop woke {wakes[0]} times in 5 s")
    assert wakes[0] <= 20  # about 10: one look of the watcher (two at most)
