"""The daemon: one task group that owns the database, the watcher, the scheduler and the
telemetry; all torch work runs on the device thread. SIGTERM/SIGINT stop it cleanly.

Several daemons may serve one ROOT, one per device (``--device cuda:1``; ``cpu:N`` names
extra CPU executors): each is an executor that claims jobs with leases (``store.leases``),
and the one that holds ``state/intake.lock`` also takes drops (``daemon.lock``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from contextlib import AsyncExitStack

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from dropkiln import __version__
from dropkiln.config import Settings
from dropkiln.daemon.device_thread import DeviceThread
from dropkiln.daemon.executor import Executor
from dropkiln.daemon.ingest import Ingestor
from dropkiln.daemon.lock import ExecutorLock, IntakeLock, device_lock_path
from dropkiln.daemon.notify import SystemdNotifier, keep_extending_timeout, watchdog_loop
from dropkiln.daemon.planner import Planner
from dropkiln.daemon.scheduler import DECISION_ATTEMPTS, RUNNABLE_CHANGES, Scheduler
from dropkiln.daemon.sweep import STALE_LEFTOVER_S, sweep_leftovers
from dropkiln.daemon.watcher import DropWatcher, Waiting
from dropkiln.daemon.webhooks import WebhookSender
from dropkiln.stages.device import device_name, memory_snapshot, resolve_device
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.models import configure_shared_pipelines
from dropkiln.store import EventStore, list_jobs, record_telemetry, unmoved_drops
from dropkiln.store.backend import open_store
from dropkiln.store.events import (
    DAEMON_STREAM,
    EVENT_TYPES,
    CancelRequested,
    DaemonStarted,
    DaemonStopped,
    DaemonStopping,
    DropWaiting,
    QueuePaused,
    QueueResumed,
    RetryRequested,
    parse_event,
)
from dropkiln.store.leases import executor_id
from dropkiln.store.telemetry import IDLE_TELEMETRY_S
from dropkiln.store.vocabulary import Lane

log = logging.getLogger(__name__)

# Every event class marked as a command (written by the CLI, the dashboard or the API).
COMMANDS = tuple(name for name, cls in EVENT_TYPES.items() if cls.command)
STOP_TIMEOUT_EXTENSION_S = 30
MOVE_RETRY_TICK_S = 0.5
# A daemon without the intake lock tries to take it this often (its holder may have died).
INTAKE_RETRY_S = 2.0


def torch_device(device: str) -> str:
    """The torch device of a daemon's ``--device``: ``cpu:N`` names one of several CPU
    executors on a box (tests, CPU-only boxes) and runs on the CPU."""
    return "cpu" if device.startswith("cpu:") else device


class Daemon:
    def __init__(self, settings: Settings, early_stop: list[str] | None = None) -> None:
        self.settings = settings
        self._early_stop = early_stop if early_stop is not None else []
        self.paths = settings.paths
        self.notifier = SystemdNotifier()
        self.faults = FaultInjector(settings.faults)
        self.started = anyio.Event()
        self.device = "cpu"
        self.executor_id = ""
        self.intake = IntakeLock(self.paths.state / "intake.lock")
        self.device_thread: DeviceThread
        self._stop = anyio.Event()
        self._stop_reason = "stopped"
        # Set when a drop's move failed and waits for its retry (the mover sleeps till then).
        self._move_pending = anyio.Event()
        self.store: EventStore
        self.scheduler: Scheduler
        self.ingestor: Ingestor

    def stop(self, reason: str = "stop requested") -> None:
        self._stop_reason = reason
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve until stopped; the caller's process may exit with 0 afterwards."""
        async with AsyncExitStack() as stack:
            requested = self.settings.device
            label = requested if requested.startswith("cpu:") else None
            self.device_thread = DeviceThread(torch_device(requested), self.settings.torch_threads)
            stack.callback(self.device_thread.close)
            self.device = await self.device_thread.run(resolve_device, torch_device(requested))
            await self.device_thread.run(self.device_thread.use_device, self.device)
            self.executor_id = executor_id(label or self.device)
            lock = ExecutorLock(
                self.paths.lock, device_lock_path(self.paths.state, label or self.device)
            )
            stack.enter_context(lock)
            stack.callback(self.intake.release)
            self.paths.create()
            self.store = await open_store(self.paths.db, self.settings.store_url, create=True)
            stack.push_async_callback(self.store.close)
            device_gb = self.settings.device_budget_gb
            configure_shared_pipelines(
                int(self.settings.ram_budget_gb * 2**30),
                None if device_gb is None else int(device_gb * 2**30),
            )
            executor = Executor(
                self.settings, self.store, self.device_thread, self.faults, self.executor_id
            )
            self.scheduler = Scheduler(self.settings, self.store, executor)
            self.ingestor = Ingestor(self.settings, self.store, Planner(self.settings, self.store))
            self.scheduler.held_drops = self._held_drops
            start_seq = await self._start(alone=lock.alone)
            lock.shared()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._take_drops, name="intake")
                tg.start_soon(self._obey_commands, start_seq, name="commands")
                tg.start_soon(self._telemetry, name="telemetry")
                tg.start_soon(watchdog_loop, self.notifier, self._hung, name="watchdog")
                if self.settings.webhooks.url:
                    sender = WebhookSender(self.settings.webhooks, self.store)
                    tg.start_soon(sender.run, None, name="webhooks")
                if handle_signals:
                    tg.start_soon(self._signals, name="signals")
                tg.start_soon(self.scheduler.run, tg, name="scheduler")
                self.notifier.ready(f"serving {self.settings.root} on {self.device}")
                self.started.set()
                if self._early_stop:
                    self.stop(f"received {self._early_stop[0]} while starting")
                log.info(
                    "dropkiln %s serving %s on %s", __version__, self.settings.root, self.device
                )
                await self._stop.wait()
                await self._shutdown(tg)

    async def _start(self, *, alone: bool) -> int:
        """Record the start, clear a dead daemon's unfinished writes (beside other daemons,
        only those untouched for an hour: theirs are not left-overs), requeue the jobs this
        executor's dead predecessor left running and those whose lease ran out."""
        started = DaemonStarted(
            pid=os.getpid(),
            host=socket.gethostname(),
            version=__version__,
            device=await self.device_thread.run(device_name, self.device),
            root=str(self.settings.root),
            executor=self.executor_id,
        )
        stored = await self.store.append(DAEMON_STREAM, [started])
        # Beside other daemons, only what no live write could still be touching.
        stale = None if alone else STALE_LEFTOVER_S
        await anyio.to_thread.run_sync(sweep_leftovers, self.paths, stale)
        if await anyio.to_thread.run_sync(self.intake.try_take):
            await self.ingestor.reconcile()
        for _ in range(DECISION_ATTEMPTS):
            # Again while one was refused (a command was written meanwhile): read again.
            if not await self.scheduler.requeue_lost(mine=self.executor_id):
                break
        for job in await list_jobs(self.store):
            if job.requested == "cancel" and not job.terminal:
                await self.scheduler.cancel(job.id, by="a request made while the daemon was down")
            elif job.requested == "retry":
                await self.scheduler.retry(job.id)
        return stored[0].seq

    async def _shutdown(self, tg: TaskGroup) -> None:
        log.info("stopping: %s", self._stop_reason)
        self.notifier.stopping("checkpointing running jobs before stopping")
        await self.store.append(DAEMON_STREAM, [DaemonStopping(reason=self._stop_reason)])
        stall = self.settings.stall_after_s
        async with keep_extending_timeout(
            self.notifier,
            STOP_TIMEOUT_EXTENSION_S,
            progressing=lambda: not self.scheduler.stalled(stall),
            limit_s=self.settings.stop_timeout_s,
        ):
            requeued = await self.scheduler.drain("daemon shutdown", self.settings.stop_timeout_s)
        await self.store.append(DAEMON_STREAM, [DaemonStopped(requeued=requeued)])
        log.info("stopped cleanly; %d job(s) will resume at next start", len(requeued))
        tg.cancel_scope.cancel()

    async def _held_drops(self) -> set[str]:
        """Drops whose move has not finished (their jobs wait): the intake's own list, or for
        the other daemons, the drops whose move the store does not record as done."""
        if self.intake.held:
            return self.ingestor.held_drops()
        return {drop["id"] for drop in await unmoved_drops(self.store)}

    async def _take_drops(self) -> None:
        """Take the intake lock once its holder is gone (unless it was taken at the start),
        finish the moves its holder left undone, then watch the drop folders."""
        if not self.intake.held:
            while not await anyio.to_thread.run_sync(self.intake.try_take):
                await anyio.sleep(INTAKE_RETRY_S)
            log.info("%s takes drops from now on", self.executor_id)
            await self.ingestor.reconcile()
            self._note_pending_moves()
            self.scheduler.wake()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, name="watcher")
            tg.start_soon(self._retry_moves, name="mover")

    async def _watch(self) -> None:
        folders = [self.paths.datasets, self.paths.prompts]
        watcher = DropWatcher(
            folders, self.settings.settle_seconds, report_after=self.settings.waiting_report_s
        )
        async for entry in watcher.settled():
            if not self.scheduler.accepting:
                return
            if isinstance(entry, Waiting):
                log.info("drop %s is waiting %s", entry.entry, entry.reason)
                waiting = DropWaiting(
                    source=str(entry.entry), reason=entry.reason, waiting_s=entry.waited_s
                )
                await self.store.append(DAEMON_STREAM, [waiting])
                continue
            if self.ingestor.holds(entry):
                continue  # taken already; its move is being retried
            try:
                await self.ingestor.ingest(entry)
            except Exception:
                # The store refused a write (disk full, a bug): the drop stays where it
                # is, untouched, and is taken at the next start.
                log.exception("could not take drop %s; it stays in the drop folder", entry)
            self._note_pending_moves()
            self.scheduler.wake()

    def _note_pending_moves(self) -> None:
        if self.ingestor.pending:
            self._move_pending.set()

    async def _retry_moves(self) -> None:
        """Retry the failed moves of drops as they fall due; asleep while none failed."""
        while True:
            if not self.ingestor.pending:
                await self._move_pending.wait()
                self._move_pending = anyio.Event()
                continue
            await anyio.sleep(MOVE_RETRY_TICK_S)
            try:
                if await self.ingestor.retry_moves():
                    self.scheduler.wake()
            except Exception:
                log.exception("could not record a drop move; trying again")

    async def _obey_commands(self, after: int) -> None:
        """Carry out the commands written to the store, and wake the scheduler when any
        process writes what may let a job start (it has no other way to know soon)."""
        async for stored in self.store.tail(after, types=COMMANDS + RUNNABLE_CHANGES):
            if stored.type in RUNNABLE_CHANGES:
                self.scheduler.wake()
                continue
            try:
                command = parse_event(stored.type, stored.data)
                if isinstance(command, CancelRequested) and stored.job_id:
                    await self.scheduler.cancel(stored.job_id, by=command.by)
                elif isinstance(command, RetryRequested) and stored.job_id:
                    await self.scheduler.retry(stored.job_id)
                elif isinstance(command, QueuePaused | QueueResumed):
                    self.scheduler.set_paused(isinstance(command, QueuePaused))
                    log.info("queue %s", "paused" if self.scheduler.paused else "resumed")
            except Exception:
                log.exception("could not carry out command %s #%d", stored.type, stored.seq)

    async def _telemetry(self) -> None:
        # Started once the scheduler exists, as _status_text and _telemetry_interval assume.
        while True:
            # Allocator counters and psutil only, no torch op: safe beside the device thread,
            # and it must not wait for a running stage.
            sample = await anyio.to_thread.run_sync(memory_snapshot, self.device)
            gpu = self.scheduler.lane_jobs(Lane.GPU)
            if gpu:
                sample["job_id"] = gpu[0].id
                sample["memory_rung"] = gpu[0].context.memory_rung
            # Other executors read it to steer GPU jobs to room (daemon/placement.py).
            sample["executor"] = self.scheduler.executor.id
            sample["device_class"] = self.scheduler.executor.device_class
            await record_telemetry(self.store, sample, self.settings.telemetry_retention_s)
            self.notifier.status(self._status_text())
            await anyio.sleep(self._telemetry_interval())

    def _telemetry_interval(self) -> float:
        """telemetry_every_s while a job runs; idle, a sample is only the heartbeat that says
        the daemon is up, and each one wakes every tail, so it comes less often."""
        if self.scheduler.running:
            return self.settings.telemetry_every_s
        return max(self.settings.telemetry_every_s, IDLE_TELEMETRY_S)

    def _hung(self) -> str | None:
        """What makes the daemon hung, for the watchdog: a stage silent for stall_after_s."""
        if not hasattr(self, "scheduler"):
            return None
        stalled = self.scheduler.stalled(self.settings.stall_after_s)
        if not stalled:
            return None
        names = ", ".join(f"{r.job.stage} job {r.id}" for r in stalled)
        return f"{names} made no progress for {self.settings.stall_after_s:g} s"

    @property
    def abandoned(self) -> list[str]:
        """Jobs whose stage was still running when the shutdown stopped waiting for it."""
        return self.scheduler.abandoned if hasattr(self, "scheduler") else []

    def _status_text(self) -> str:
        running = list(self.scheduler.running.values())
        if not running:
            return "idle, paused" if self.scheduler.paused else "idle"
        parts = [f"{r.job.stage} {r.job.name} ({r.id})" for r in running]
        return "running " + ", ".join(parts)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.stop(f"received {signal.Signals(signum).name}")
                return
