"""Which job runs next: dependencies done, then priority, then FIFO; one GPU job at a time.

The GPU lane runs one job; the CPU lane runs up to ``cpu_workers`` jobs and never waits
behind the GPU. A runnable GPU job of higher priority than the running one preempts it:
the running stage is asked to checkpoint and yield, and resumes later.

``preempt_after_s`` is the least time an attempt keeps the GPU before it can be preempted:
each preemption costs a checkpoint write and a model switch, so a stream of prompt files
must not keep a training run from ever making progress. A higher-priority job therefore
waits at most ``preempt_after_s`` plus the time the running stage takes to notice (one
micro-batch, or one validation image) and save its checkpoint.

Several daemons (executors) may share the store: each runs this scheduler over its own
lanes, starting a job claims it (``store.leases``), so each job runs on one of them, and
every pass requeues the running jobs whose lease ran out, wherever they ran.

A pass runs when something may have changed what can start: this daemon's own job ended,
a command came, or the store's tail saw one of ``RUNNABLE_CHANGES`` (a job submitted,
requeued or ended, a drop's move done), written by this process or any other. Nothing
says when a lease runs out, so a pass also runs every ``pass_every_s`` (a third of
``lease_seconds``); an idle daemon does nothing in between.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

from dropkiln.config import Settings
from dropkiln.daemon.executor import Executor, RunningJob
from dropkiln.store import ConcurrencyError, EventStore, JobView, find_job, list_jobs, queue_paused
from dropkiln.store.events import (
    DropMoveAbandoned,
    DropMoved,
    Event,
    JobCancelled,
    JobFailed,
    JobInterrupted,
    JobPreempted,
    JobQueued,
    JobSubmitted,
    JobSucceeded,
    OutOfMemory,
    RetryScheduled,
    job_stream,
    parse_event,
)
from dropkiln.store.leases import lost_leases, requeue_lost
from dropkiln.store.vocabulary import JobState, Lane

log = logging.getLogger(__name__)

# A decision that lost a race re-reads the job and decides again, this many times at most.
# Each conflict means another writer appended in between; more than a few in a row means
# the job is busy enough that the next scheduling pass is the better place to decide.
DECISION_ATTEMPTS = 5
RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED})
ENDINGS = (JobFailed.type_name(), JobCancelled.type_name())
RUNNABLE_CHANGES = tuple(
    event.type_name()
    for event in (
        JobSubmitted,  # a new job
        JobQueued,  # requeued: a retry, a lost lease, a shutdown
        OutOfMemory,  # back in the queue at a lower rung
        RetryScheduled,
        JobPreempted,  # its GPU is free for the job it gave way to
        JobInterrupted,
        JobSucceeded,  # its dependents may start, its lane is free
        JobFailed,  # its dependents end too
        JobCancelled,
        DropMoved,  # the jobs of a drop wait for its move
        DropMoveAbandoned,
    )
)
"""Events after which a job may start (or must end) that could not before, from any process:
the daemon's tail wakes the scheduler for them."""
LEASE_CHECKS_PER_LEASE = 3
"""Passes per ``lease_seconds`` when nothing else wakes the scheduler: a job whose daemon
died is requeued at most a third of a lease after its lease ran out."""
LEFT_JOB_PASS_S = 1.0
"""How often the scheduler looks again while it leaves a GPU job to a roomier device."""


def _negated(at: str | None) -> tuple[int, ...]:
    """Sorts ISO timestamps newest first."""
    return tuple(-ord(c) for c in at or "")


async def _no_drops() -> set[str]:
    return set()


class Scheduler:
    def __init__(self, settings: Settings, store: EventStore, executor: Executor) -> None:
        self.settings = settings
        self.store = store
        self.executor = executor
        self.running: dict[str, RunningJob] = {}
        # Cancels that found the job's JobStarted committed but its attempt not yet
        # registered here: _start stops the attempt as soon as it is.
        self._cancel_on_start: set[str] = set()
        self.limiters = {
            Lane.GPU: anyio.CapacityLimiter(1),
            Lane.CPU: anyio.CapacityLimiter(settings.cpu_workers),
        }
        self.accepting = True
        # Drops whose move is not done (the daemon sets this): their jobs wait for it.
        self.held_drops: Callable[[], Awaitable[set[str]]] = _no_drops
        self.paused = False
        self.abandoned: list[str] = []
        """Jobs still running when a shutdown stopped waiting for them."""
        self._ended_in: dict[str, JobState] = {}
        """The state each job's latest attempt ended in, as its executor reported it."""
        self._wake = anyio.Event()
        self.pass_every_s = settings.executor.lease_seconds / LEASE_CHECKS_PER_LEASE
        self._next_pass_in = self.pass_every_s
        self._idle = anyio.Event()
        self._idle.set()

    def wake(self) -> None:
        self._wake.set()

    def stalled(self, after_s: float) -> list[RunningJob]:
        """Running jobs whose stage has not called its context for ``after_s`` seconds."""
        now = time.monotonic()
        return [r for r in self.running.values() if now - r.context.last_sign_of_life > after_s]

    def lane_jobs(self, lane: Lane) -> list[RunningJob]:
        return [r for r in self.running.values() if r.job.lane == lane]

    async def run(self, tg: TaskGroup) -> None:
        self.paused = await queue_paused(self.store)
        while self.accepting:
            self._next_pass_in = self.pass_every_s
            await self.schedule(tg)
            with anyio.move_on_after(self._next_pass_in):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def schedule(self, tg: TaskGroup) -> None:
        """One pass: requeue jobs whose lease was lost, settle dependency failures, start
        what may start, preempt if needed."""
        if await self.requeue_lost():
            self.wake()
        jobs = await list_jobs(self.store, active_only=True)
        runnable: list[JobView] = []
        held = await self.held_drops()
        for job in jobs:
            if job.id in self.running or job.drop_id in held:
                continue
            if job.state == JobState.WAITING:
                await self._check_dependencies(job)
            elif job.state == JobState.QUEUED and self.executor.serves(job):
                runnable.append(job)
        if self.paused or not self.accepting:
            return
        runnable.sort(key=lambda j: (-j.priority, j.submitted_seq))
        # GPU jobs of every executor, the first to give way first: lowest priority, then
        # the one that started last (least work since its checkpoint).
        yielding = sorted(
            (j for j in jobs if j.state == JobState.RUNNING and j.lane == Lane.GPU),
            key=lambda j: (j.priority, _negated(j.started_at)),
        )
        for job in runnable:
            lane = Lane(job.lane)
            busy = self.lane_jobs(lane)
            capacity = 1 if lane == Lane.GPU else self.settings.cpu_workers
            if len(busy) < capacity:
                if lane == Lane.GPU and await self.executor.roomier_executor(job):
                    # Another device has more room for it: left to that one a while, and
                    # nothing but the clock says when the while is over.
                    self._next_pass_in = min(self._next_pass_in, LEFT_JOB_PASS_S)
                    continue
                await self._start(tg, job)
            elif lane == Lane.GPU:
                # Several executors see the same waiting job: only the one whose job is
                # next to give way preempts it, so one job waiting costs one preemption.
                victim = next((j for j in yielding if j.priority < job.priority), None)
                if victim is not None:
                    yielding.remove(victim)
                    if victim.id == busy[0].id:
                        self._maybe_preempt(job, busy[0])

    async def requeue_lost(self, mine: str | None = None) -> list[str]:
        """Running jobs whose lease is lost (see ``leases.lost_leases``; ``mine`` is this
        executor's id at start-up, when its leases belong to its dead predecessor) go back to
        the queue to resume from their checkpoint; a cancel asked for meanwhile ends them
        instead (JobQueued would clear the request). Returns the jobs requeued."""
        lost = set(await lost_leases(self.store, mine)) - self.running.keys()
        if not lost:
            return []
        requeued: list[str] = []
        for job in await list_jobs(self.store, active_only=True):
            if job.id not in lost or job.state != JobState.RUNNING:
                continue
            then: Event
            if job.requested == "cancel":
                then = JobCancelled(reason="cancelled by a request made while its daemon was gone")
            else:
                then = JobQueued(reason=f"lease of {job.executor or 'a daemon'} lost")
            events = [JobInterrupted(previous_attempt=job.attempt), then]
            try:
                if await requeue_lost(self.store, job.id, job.version, job.attempt, events, mine):
                    log.warning("job %s lost its executor's lease: %s", job.id, then.type_name())
                    requeued.append(job.id)
            except ConcurrencyError:
                continue  # another executor requeued it, or a command came: next pass
        return requeued

    def _maybe_preempt(self, waiting: JobView, current: RunningJob) -> None:
        if waiting.priority > current.job.priority and current.context.stop_reason is None:
            too_soon = self.settings.preempt_after_s - (time.monotonic() - current.started)
            if too_soon > 0:
                self._next_pass_in = min(self._next_pass_in, too_soon)
                return
            log.info(
                "preempting %s job %s for %s job %s",
                current.job.stage,
                current.id,
                waiting.stage,
                waiting.id,
            )
            current.context.request_stop(f"preempted by {waiting.stage} job {waiting.id}")

    async def _check_dependencies(self, job: JobView) -> None:
        """End a waiting job whose dependency failed or was cancelled. Appended with the
        version read: if the job changed meanwhile, the next pass looks again."""
        for dep in job.depends_on:
            dep_job = await find_job(self.store, dep)
            ending: Event
            if dep_job.state == JobState.FAILED:
                reason = f"dependency {dep_job.stage} job {dep} failed: {dep_job.error}"
                ending = JobFailed(reason=reason, caused_by=dep)
            elif dep_job.state == JobState.CANCELLED:
                reason = f"dependency {dep_job.stage} job {dep} was cancelled"
                ending = JobCancelled(reason=reason, caused_by=dep)
            else:
                continue
            try:
                await self.store.append(job_stream(job.id), [ending], job.version)
            except ConcurrencyError:
                self.wake()
            return

    async def _start(self, tg: TaskGroup, job: JobView) -> None:
        try:
            running = await self.executor.prepare(job)
        except ConcurrencyError:
            # Someone wrote to the job after we read it (a cancel, most likely): not
            # started; the next pass decides again from what it is now.
            log.info("job %s changed while it was being started; looking again", job.id)
            self.wake()
            return
        self.running[job.id] = running
        self._idle = anyio.Event()
        if job.id in self._cancel_on_start:
            self._cancel_on_start.discard(job.id)
            running.context.request_stop("cancel")
        tg.start_soon(self._run, running, name=f"job {job.id}")

    async def _run(self, running: RunningJob) -> None:
        try:
            ended = await self.executor.run(running, self.limiters[Lane(running.job.lane)])
            self._ended_in[running.id] = ended
        finally:
            del self.running[running.id]
            if not self.running:
                self._idle.set()
            self.wake()

    # Commands ------------------------------------------------------------------------------

    async def cancel(self, job_id: str, by: str = "request") -> None:
        """A running attempt is asked to stop (its executor records JobCancelled); a job
        that has not started is cancelled here, with the version read, so a start that
        won the race is never followed by a second ending."""
        for _ in range(DECISION_ATTEMPTS):
            if job_id in self.running:
                self.running[job_id].context.request_stop("cancel")
                return
            job = await find_job(self.store, job_id)
            if job.terminal:
                return
            if job.state == JobState.RUNNING:
                self._cancel_on_start.add(job_id)
                return
            cancelled = JobCancelled(reason=f"cancelled by {by} before it ran")
            try:
                await self.store.append(job_stream(job_id), [cancelled], job.version)
            except ConcurrencyError:
                continue
            self.wake()
            return
        log.warning("cancel of job %s gave up: the job kept changing under it", job_id)

    async def retry(self, job_id: str) -> None:
        for _ in range(DECISION_ATTEMPTS):
            try:
                await self._retry(job_id)
                return
            except ConcurrencyError:
                continue
        log.warning("retry of job %s gave up: the job kept changing under it", job_id)

    async def _retry(self, job_id: str) -> None:
        job = await find_job(self.store, job_id)
        if job.state not in RETRYABLE:
            log.info("retry of job %s ignored: it is %s", job_id, job.state)
            return
        events: list[tuple[str, list[Event]]] = [
            (job_stream(job_id), [JobQueued(reason="retry requested")])
        ]
        read_at: dict[str, int | None] = {job_stream(job_id): job.version}
        # Dependents that ended only because this job did are requeued with it, and theirs
        # in turn (a failed cache job also ended the train, generate and video jobs after it).
        requeued = {job_id}
        others = [o for o in await list_jobs(self.store) if o.state in RETRYABLE and o.depends_on]
        causes = {other.id: await self._ended_by(other.id) for other in others}
        while True:
            more = [o for o in others if o.id not in requeued and causes[o.id] in requeued]
            if not more:
                break
            for other in more:
                dep = next(d for d in other.depends_on if d in requeued)
                requeue = JobQueued(reason=f"dependency {dep} retried")
                events.append((job_stream(other.id), [requeue]))
                read_at[job_stream(other.id)] = other.version
                requeued.add(other.id)
        await self.store.append_batch(events, read_at)
        self.wake()

    async def _ended_by(self, job_id: str) -> str | None:
        """The dependency that ended the job (its newest JobFailed or JobCancelled says)."""
        newest = await self.store.last(job_stream(job_id), types=ENDINGS)
        if not newest:
            return None
        ending = parse_event(newest[0].type, newest[0].data)
        return ending.caused_by if isinstance(ending, JobFailed | JobCancelled) else None

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.wake()

    async def drain(self, reason: str, timeout_s: float = math.inf) -> list[str]:
        """Stop taking work, ask running jobs to checkpoint and stop, wait for them (at most
        ``timeout_s``); returns the jobs to resume later: those that stopped, and those still
        running when the wait ended (their attempt is abandoned; the next start requeues it
        from its last checkpoint). One that finished meanwhile is not among them."""
        self.accepting = False
        stopping = list(self.running)
        for running in self.running.values():
            running.context.request_stop(reason)
        with anyio.move_on_after(timeout_s):
            await self._idle.wait()
        self.abandoned = list(self.running)
        for job_id in self.abandoned:
            log.error(
                "job %s did not stop within %g s; it resumes from its last checkpoint at the"
                " next start",
                job_id,
                timeout_s,
            )
        return [job_id for job_id in stopping if not self._ended_terminal(job_id)]

    def _ended_terminal(self, job_id: str) -> bool:
        if job_id in self.running:
            return False  # abandoned: still running
        ended = self._ended_in.get(job_id)
        return ended is not None and ended.terminal
