"""Runs one attempt of one job and turns how it ended into events.

The memory ladder lives here: on an out-of-memory error (``stages/oom.py``) it is recorded as
``OutOfMemory`` with a memory snapshot, memory is released, and the job is requeued one
rung down (``RetryScheduled``) to resume from its last checkpoint; at the bottom rung it
fails with a reason that lists what was tried.

The first rung of an attempt (``starting_rung``): on a GPU, the stage's estimate from the
memory available now; a remembered rung that is safer wins; after ``[memory]
reprobe_after`` clean runs at that rung, one rung up is tried; a retry keeps the rung it
was scheduled on. JobStarted records which of these chose it.

Each daemon is one executor (``store.leases``): it claims a job (JobClaimed with JobStarted,
one transaction), renews the lease every ``[executor] heartbeat_seconds`` while the attempt
runs, and every write of the attempt is fenced by it. An attempt whose lease is lost (the
heartbeat says so, or the context sees the lease run out on its own clock, as after a
SIGSTOP) stops at its next check and writes nothing more: another executor has the job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from dropkiln.config import Settings
from dropkiln.daemon.context import LEASE_LOST, PROGRESS_EVERY_S, DaemonContext
from dropkiln.daemon.device_thread import DeviceThread
from dropkiln.daemon.inputs import job_inputs, wait_for_inputs
from dropkiln.daemon.placement import Steering, estimate_start_rung
from dropkiln.stages import StageDef, StageError, StageStopped, get_stage
from dropkiln.stages.device import is_out_of_memory, memory_snapshot, release_memory
from dropkiln.stages.faults import FaultInjector, take_torn_write
from dropkiln.store import (
    ConcurrencyError,
    EventStore,
    JobView,
    clean_runs,
    find_job,
    job_artifacts,
    remembered_rung,
)
from dropkiln.store.events import (
    Event,
    JobCancelled,
    JobFailed,
    JobPreempted,
    JobStarted,
    JobSucceeded,
    OutOfMemory,
    RetryScheduled,
)
from dropkiln.store.leases import Candidate, Fence, LeaseLost, append_fenced, claim, renew
from dropkiln.store.vocabulary import JobState, Lane

log = logging.getLogger(__name__)


@dataclass
class RunningJob:
    job: JobView
    stage: StageDef
    context: DaemonContext
    fence: Fence
    started: float = field(default_factory=time.monotonic)
    """When this attempt started (monotonic): ``preempt_after_s`` counts from here."""
    recording: anyio.Lock = field(default_factory=anyio.Lock)
    """Held while the loop records the attempt's progress or its end, so no progress is
    recorded after the job has ended."""

    @property
    def id(self) -> str:
        return self.job.id


class Executor:
    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        device_thread: DeviceThread,
        faults: FaultInjector,
        executor_id: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.device_thread = device_thread
        self.device = device_thread.device
        self.faults = faults
        self.id = executor_id
        self.lease_s = settings.executor.lease_seconds
        self.heartbeat_s = settings.executor.heartbeat_seconds
        self.input_wait_s = settings.executor.input_wait_seconds
        self.device_class = settings.executor.device_class or self.device.split(":")[0]
        """What jobs pinned to a device class must name for this executor to claim them."""
        self.steering = Steering(self)

    def serves(self, job: JobView) -> bool:
        """Whether this executor may claim the job: it is pinned to no class, or to ours."""
        return job.device_class is None or job.device_class == self.device_class

    async def append(self, fence: Fence, events: list[Event]) -> None:
        """Record events of the attempt ``fence`` names; LeaseLost once it is not current."""
        await append_fenced(self.store, fence, events)

    async def prepare(self, job: JobView) -> RunningJob:
        """Pick the rung, gather upstream results, claim the job (JobClaimed, JobStarted).
        ConcurrencyError when another executor claimed it or it changed since it was read."""
        stage = get_stage(job.stage)
        rung, reason = await self.starting_rung(job, stage)
        upstream: dict[str, dict[str, Any]] = {}
        for dep in job.depends_on:
            dep_job = await find_job(self.store, dep)
            upstream[dep_job.stage] = dep_job.result or {}
        work_dir = self.settings.paths.work / job.id
        work_dir.mkdir(parents=True, exist_ok=True)
        attempt = job.attempt + 1
        fence = Fence(job.id, self.id, attempt)
        context = DaemonContext(
            job_id=job.id,
            attempt=attempt,
            memory_rung=rung,
            device=self.device,
            root=self.settings.root,
            work_dir=work_dir,
            resume=job.checkpoint,
            upstream=upstream,
            recorded={a["path"]: a["sha256"] for a in await job_artifacts(self.store, job.id)},
            faults=self.faults,
            append=lambda events: self.append(fence, events),
            token=anyio.lowlevel.current_token(),
            lease_s=self.lease_s,
        )
        # With the version the scheduler read: a cancel (or anything) written since, or a
        # claim by another executor, and the job is not started on a stale decision.
        started = JobStarted(
            attempt=attempt, memory_rung=rung, rung_name=stage.rung(rung).name, rung_reason=reason
        )
        candidate = Candidate(job.id, job.version, attempt, [started])
        if await claim(self.store, [candidate], self.id, self.lease_s) is None:
            raise ConcurrencyError(f"job {job.id} was claimed or changed since it was read")
        log.info(
            "started %s job %s (%s), attempt %d, memory rung %s (%s)",
            job.stage,
            job.id,
            job.name,
            attempt,
            stage.rung(rung).name,
            reason,
        )
        return RunningJob(job, stage, context, fence)

    async def roomier_executor(self, job: JobView) -> str | None:
        """Another live executor to leave this GPU job to, or None: claim it here
        (``daemon/placement.py``)."""
        return await self.steering.roomier_executor(job, get_stage(job.stage))

    async def starting_rung(self, job: JobView, stage: StageDef) -> tuple[int, str]:
        """The rung this attempt starts on, and why (JobStarted's ``rung_reason``)."""
        rung, reason = 0, "default"
        remembered = await remembered_rung(self.store, job.rung_key) if job.rung_key else 0
        if remembered > 0:
            rung, reason = remembered, "remembered"
        estimate = await self._estimate(job, stage)
        if estimate is not None and (estimate > rung or reason == "default"):
            rung, reason = estimate, "estimate"
        # A rung learned while something else filled the device would stick forever: after
        # enough clean runs on it, one job tries the rung above (an OOM there steps back).
        reprobe = self.settings.memory.reprobe_after
        if (
            job.rung_key
            and rung > 0
            and reprobe > 0
            and await clean_runs(self.store, job.rung_key, rung, reprobe) >= reprobe
        ):
            rung, reason = rung - 1, "re-probe"
        if job.memory_rung > rung:
            rung, reason = job.memory_rung, "retry"
        return min(rung, len(stage.ladder) - 1), reason

    async def _estimate(self, job: JobView, stage: StageDef) -> int | None:
        """The stage's estimate from the memory available on a GPU; None on the CPU, for
        stages without one, and when it cannot be made (the job then starts as before)."""
        if stage.start_rung is None or not self.device.startswith("cuda"):
            return None
        try:
            return await self.device_thread.run(
                estimate_start_rung, stage, job, str(self.settings.root), self.device
            )
        except Exception:
            log.warning("no starting-rung estimate for job %s", job.id, exc_info=True)
            return None

    async def run(self, running: RunningJob, limiter: anyio.CapacityLimiter) -> JobState:
        """Run the attempt (GPU lane: on the device thread; CPU lane, which never touches
        torch: in a worker thread) while heart-beating its lease; returns the state the job
        ended in (queued when the lease was lost: another executor has it now)."""
        ended = JobState.QUEUED
        async with anyio.create_task_group() as heartbeats:
            heartbeats.start_soon(self._heartbeat, running, name=f"lease {running.id}")
            heartbeats.start_soon(self._report_progress, running, name=f"progress {running.id}")
            try:
                unseen = await self._wait_for_inputs(running)
                if unseen is not None:
                    ended = await self._finish(running, JobFailed(reason=unseen), JobState.FAILED)
                else:
                    ended = await self._attempt(running, limiter)
            except LeaseLost as exc:
                running.context.request_stop(LEASE_LOST)
                log.warning("%s; the attempt stopped without writing more", exc)
            finally:
                heartbeats.cancel_scope.cancel()
        return ended

    async def _wait_for_inputs(self, running: RunningJob) -> str | None:
        """The reason the job cannot start: a file its dependencies recorded is not visible."""
        inputs = await job_inputs(self.store, running.job.depends_on, running.stage.inputs)
        return await wait_for_inputs(inputs, self.input_wait_s, running.context.should_stop)

    async def _heartbeat(self, running: RunningJob) -> None:
        ctx = running.context
        while True:
            await anyio.sleep(self.heartbeat_s)
            asked = time.monotonic()
            try:
                renewed = await renew(self.store, running.fence, self.lease_s)
            except Exception:
                # The store is unreachable (or ended this session): the attempt goes on until
                # its lease runs out on its own clock (the context checks), then stops.
                log.warning("could not renew the lease of job %s", running.id, exc_info=True)
                continue
            if renewed is None:
                log.warning("job %s: lease lost; stopping the attempt", running.id)
                ctx.request_stop(LEASE_LOST)
                return
            ctx.lease_renewed(asked)

    async def _report_progress(self, running: RunningJob) -> None:
        """Record the stage's latest progress about twice a second (its end records the last)."""
        while True:
            await anyio.sleep(PROGRESS_EVERY_S)
            async with running.recording:
                pending = running.context.take_pending_progress()
                if not pending:
                    continue
                try:
                    await self.append(running.fence, [*pending])
                except LeaseLost:
                    running.context.request_stop(LEASE_LOST)
                    return
                except Exception:
                    # progress is only shown: a failed write is not worth stopping the job for
                    log.warning(
                        "could not record the progress of job %s", running.id, exc_info=True
                    )

    async def _attempt(self, running: RunningJob, limiter: anyio.CapacityLimiter) -> JobState:
        job, stage, ctx = running.job, running.stage, running.context
        oom: OutOfMemory | None = None
        try:
            spec = stage.spec.model_validate(job.spec)
            # Abandoned, not awaited, if the daemon is cancelled: a hung stage must not hold
            # up a shutdown past stop_timeout_s (its job resumes at the next start).
            if Lane(stage.lane) == Lane.GPU:
                await self.device_thread.run(self.device_thread.prepare_torch)
                result = await self.device_thread.run(
                    _run_stage, stage, spec, ctx, abandon_on_cancel=True
                )
            else:
                result = await anyio.to_thread.run_sync(
                    _run_stage, stage, spec, ctx, limiter=limiter, abandon_on_cancel=True
                )
        except StageStopped:
            return await self._stopped(running)
        except StageError as exc:
            return await self._finish(running, JobFailed(reason=str(exc)), JobState.FAILED)
        except Exception as exc:
            if not is_out_of_memory(exc):
                log.exception("job %s failed", job.id)
                reason = f"{type(exc).__name__}: {exc}"
                return await self._finish(running, JobFailed(reason=reason), JobState.FAILED)
            rung = stage.rung(ctx.memory_rung)
            oom = OutOfMemory(
                memory_rung=ctx.memory_rung,
                rung_name=rung.name,
                snapshot=await self.device_thread.run(memory_snapshot, self.device),
                message=str(exc).splitlines()[0][:500],
            )
        if oom is not None:
            # Outside the except block, so the traceback (and the tensors its frames hold)
            # is gone before memory is released. Other warm pipelines go first: the job
            # retries on the same rung when they were what filled the device.
            evicted = await self.device_thread.run(_evict_other_pipelines, self.device)
            oom = oom.model_copy(update={"evicted": evicted})
            await self.device_thread.run(release_memory, self.device)
            return await self._out_of_memory(running, oom)
        return await self._finish(running, JobSucceeded(result=result or {}), JobState.SUCCEEDED)

    async def _finish(self, running: RunningJob, final: Event, state: JobState) -> JobState:
        async with running.recording:
            pending = running.context.take_pending_progress()
            await self.append(running.fence, [*pending, final])
        log.info("%s job %s %s", running.job.stage, running.id, state)
        return state

    async def _stopped(self, running: RunningJob) -> JobState:
        reason = running.context.stop_reason
        if reason == LEASE_LOST:
            log.warning("job %s: lease lost; the attempt stopped, nothing recorded", running.id)
            return JobState.QUEUED
        if reason == "cancel":
            return await self._finish(running, JobCancelled(), JobState.CANCELLED)
        if reason is None:
            failed = JobFailed(reason="the stage stopped without being asked to")
            return await self._finish(running, failed, JobState.FAILED)
        return await self._finish(running, JobPreempted(by=reason), JobState.QUEUED)

    async def _out_of_memory(self, running: RunningJob, oom: OutOfMemory) -> JobState:
        ladder = running.stage.ladder
        next_rung = oom.memory_rung if oom.evicted else oom.memory_rung + 1
        if next_rung < len(ladder):
            retry = RetryScheduled(
                next_rung=next_rung,
                rung_name=ladder[next_rung].name,
                resume_from=running.context.resume_state(),
            )
            log.warning(
                "job %s ran out of memory at rung %s; retrying at %s",
                running.id,
                oom.rung_name,
                retry.rung_name,
            )
            async with running.recording:
                await self.append(running.fence, [oom, retry])
            return JobState.QUEUED
        tried = ", ".join(r.name for r in ladder)
        reason = f"out of memory on every memory rung (tried: {tried}); last: {oom.message}"
        async with running.recording:
            await self.append(running.fence, [oom, JobFailed(reason=reason)])
        return JobState.FAILED


def _evict_other_pipelines(device: str) -> list[str]:
    from dropkiln.stages.models import shared_pipelines

    return shared_pipelines().evict_all_but_newest(device)


def _run_stage(stage: StageDef, spec: Any, ctx: DaemonContext) -> dict[str, Any]:
    try:
        return stage.execute(spec, ctx)
    finally:
        take_torn_write()  # a torn write armed by a fault never outlives its job's thread
