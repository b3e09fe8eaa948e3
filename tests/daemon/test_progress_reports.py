"""Progress never holds up the stage: it is kept on the context and the event loop records
it (about twice a second, and with the job's end), so a stage's thread does not wait for a
commit to report a step. Checkpoints and files still wait for theirs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from dropkiln.config import Settings
from dropkiln.daemon.context import DaemonContext
from dropkiln.stages.faults import FaultInjector
from dropkiln.store import EventStore
from dropkiln.store.events import Event, job_stream
from tests.daemon.harness import ended, running_daemon, submit, use_step_stages, wait_job


async def test_a_progress_report_does_not_wait_for_the_store(tmp_path: Path) -> None:
    committed = threading.Event()
    appends: list[list[Event]] = []

    async def slow_append(events: list[Event]) -> None:
        await anyio.sleep(5)  # a commit stuck behind a busy disk
        appends.append(events)
        committed.set()

    ctx = DaemonContext(
        job_id="job", attempt=1, memory_rung=0, device="cpu", root=tmp_path,
        work_dir=tmp_path, resume=None, upstream={}, faults=FaultInjector(),
        append=slow_append, token=anyio.lowlevel.current_token(),
    )  # fmt: skip

    def report() -> float:
        started = time.monotonic()
        ctx.progress(1, 2)  # the first report, and the last (done == total) used to be sent
        ctx.progress(2, 2)
        return time.monotonic() - started

    with anyio.fail_after(10):
        took = await anyio.to_thread.run_sync(report)
    assert took < 1.0, f"progress waited {took:.2f}s for the store"
    assert appends == []  # nothing appended behind the loop's back
    # the attempt's first report (where a resumed attempt began) and the latest, in order
    pending = ctx.take_pending_progress()
    assert [(p.done, p.total) for p in pending] == [(1, 2), (2, 2)]
    assert ctx.take_pending_progress() == []
    for done in (3, 4, 5):
        ctx.progress(done, 9)
    assert [p.done for p in ctx.take_pending_progress()] == [5]


@pytest.fixture
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


@pytest.mark.usefixtures("_stages")
async def test_the_loop_records_progress_while_the_job_runs_and_none_after_it(
    settings: Settings,
) -> None:
    async with await EventStore.open(settings.paths.db, create=True) as store:
        await submit(store, "p1", steps=6, sleep=0.25)
    async with running_daemon(settings) as daemon:
        await wait_job(daemon.store, "p1", ended)
        events = await daemon.store.read(0, stream=job_stream("p1"), limit=None)
    types = [event.type for event in events]
    assert types[-1] == "JobSucceeded", types
    progress = [event.data for event in events if event.type == "JobProgress"]
    # ~1.5 s of steps: recorded while running (not only at the end), the last one 6 of 6
    assert len(progress) >= 2, types
    assert types.index("JobProgress") < types.index("JobSucceeded") - 1
    assert (progress[-1]["done"], progress[-1]["total"]) == (6, 6)
