"""Run a real Daemon in the test's event loop, with the step stages of stepstage.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from dropkiln.config import Settings
from dropkiln.daemon import executor, planner
from dropkiln.daemon.service import Daemon
from dropkiln.stages import get_stage
from dropkiln.store import EventStore, JobView, find_job
from dropkiln.store.events import JobSubmitted, job_stream
from tests.daemon.stepstage import STAGES


def use_step_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    def lookup(name: str) -> Any:
        return STAGES[name] if name in STAGES else get_stage(name)

    monkeypatch.setattr(executor, "get_stage", lookup)
    monkeypatch.setattr(planner, "get_stage", lookup)


@asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        with anyio.fail_after(20):
            await daemon.started.wait()
        try:
            yield daemon
        finally:
            daemon.stop("test finished")


async def submit(
    store: EventStore,
    job_id: str,
    stage: str = "steps",
    depends_on: list[str] | None = None,
    rung_key: str | None = None,
    device_class: str | None = None,
    **spec: Any,
) -> None:
    definition = STAGES[stage]
    await store.append(
        job_stream(job_id),
        [
            JobSubmitted(
                job_id=job_id,
                stage=stage,
                name=f"test-{job_id}",
                lane=definition.lane,
                priority=definition.priority,
                spec=definition.spec.model_validate(spec).model_dump(),
                depends_on=depends_on or [],
                rung_key=rung_key,
                device_class=device_class,
            )
        ],
    )


async def wait_job(
    store: EventStore, job_id: str, until: Callable[[JobView], bool], timeout: float = 20
) -> JobView:
    with anyio.fail_after(timeout):
        while True:
            try:
                job = await find_job(store, job_id)
                if until(job):
                    return job
            except Exception as exc:
                if "no job" not in str(exc):
                    raise
            await anyio.sleep(0.05)


async def types_of(store: EventStore, job_id: str) -> list[str]:
    return [e.type for e in await store.read(0, stream=job_stream(job_id), limit=None)]


def ended(job: JobView) -> bool:
    return job.terminal
