"""Decoding untrusted files in worker processes, so a decoder that crashes costs one file.

Always a process pool, even for one worker and a handful of files: a crash (a segfault in
a codec, an abort, the kernel's OOM killer) then kills a worker, never the daemon, and
the file that did it is found by running the lost files again one at a time, each in a
fresh one-process pool. Workers start by forkserver (or spawn): the daemon has threads.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from dropkiln.stages.base import StageContext, StageStopped

Task = TypeVar("Task")
Outcome = TypeVar("Outcome")

STOP_CHECK_EVERY = 16
"""Files between two ``should_stop`` checks; a rerun redoes at most this many (cheaply)."""
IN_FLIGHT_PER_WORKER = 2
"""Files queued per worker: enough to keep cores busy, few enough to stop quickly."""
WORKER_PRELOAD = ["numpy", "PIL.Image", "PIL.ImageCms", "PIL.PngImagePlugin", "pydantic_settings"]


def run_in_pool(
    tasks: list[Task],
    work: Callable[[Task], Outcome],
    workers: int,
    ctx: StageContext,
    record: Callable[[Outcome], None],
    crashed: Callable[[Task], Outcome],
    dispatch: Callable[[Task], Task] = lambda task: task,
) -> None:
    """``record(work(task))`` for every task, in ``workers`` processes; a task whose worker
    died even when run alone is recorded as ``crashed(task)``. ``dispatch`` sees each task
    as it is handed to a worker (fault points) and may return a changed one."""
    stop_check = _StopCheck(ctx)
    queue = deque(tasks)
    while queue:
        lost = _run_batch(queue, work, max(1, workers), stop_check, record, dispatch)
        _run_one_by_one(lost, work, record, crashed)


def _run_batch(
    queue: deque[Task],
    work: Callable[[Task], Outcome],
    workers: int,
    stop_check: _StopCheck,
    record: Callable[[Outcome], None],
    dispatch: Callable[[Task], Task],
) -> list[Task]:
    """Run queued tasks in a pool; if a worker dies, return the tasks it lost."""
    pool = new_pool(workers)
    in_flight: dict[Future[Outcome], Task] = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < IN_FLIGHT_PER_WORKER * workers:
                stop_check.tick()
                task = dispatch(queue.popleft())
                in_flight[pool.submit(work, task)] = task
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    return _salvage(in_flight, record)
                record(future.result())
                del in_flight[future]
        return []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _salvage(
    in_flight: dict[Future[Outcome], Task], record: Callable[[Outcome], None]
) -> list[Task]:
    """After a worker died: keep what finished, return the rest (the culprit among them)."""
    wait(in_flight)
    lost = []
    for future, task in in_flight.items():
        error = future.exception()
        if error is None:
            record(future.result())
        elif isinstance(error, BrokenProcessPool):
            lost.append(task)
        else:
            raise error
    return lost


def _run_one_by_one(
    tasks: list[Task],
    work: Callable[[Task], Outcome],
    record: Callable[[Outcome], None],
    crashed: Callable[[Task], Outcome],
) -> None:
    """Run tasks one at a time in a one-process pool, so a crash names its file."""
    pool: ProcessPoolExecutor | None = None
    try:
        for task in tasks:
            pool = pool or new_pool(1)
            try:
                record(pool.submit(work, task).result())
            except BrokenProcessPool:
                record(crashed(task))
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


class _StopCheck:
    """Calls ``should_stop`` before the first task and then every STOP_CHECK_EVERY tasks."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.count = 0

    def tick(self) -> None:
        if self.count % STOP_CHECK_EVERY == 0 and self.ctx.should_stop():
            raise StageStopped(f"stopped after {self.count} files")
        self.count += 1


def new_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes that end when this process ends, even by SIGKILL."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=process_context(),
        initializer=_end_with,
        initargs=(os.getpid(),),
    )


def _end_with(owner: int) -> None:
    """In a worker: exit as soon as ``owner`` (the daemon) has ended.

    A forkserver worker holds a copy of the fork server's liveness pipe and of its own task
    pipe, so after the daemon is killed with SIGKILL neither the worker nor the fork server
    ever reads end-of-file: both would wait forever, holding their memory. A pidfd becomes
    readable when its process ends; the worker's exit then closes the last copy of the
    liveness pipe, and the fork server ends too."""
    try:
        watched = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        return  # no pidfd here (Linux before 5.3, other systems): nothing to wait on

    def wait_for_owner() -> None:
        select.select([watched], [], [])
        os._exit(1)

    threading.Thread(target=wait_for_owner, name="dropkiln-owner", daemon=True).start()


def process_context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Workers fork with the heavy libraries already imported. Not dropkiln itself: the
        # fork server does not get our sys.path, so it could find another copy of dropkiln.
        # (Takes effect only if the fork server is not running yet.)
        context.set_forkserver_preload(WORKER_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def worker_count(configured: int, files: int) -> int:
    """``configured`` processes (0: one per core), never more than there are files."""
    if configured == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        configured = cores or os.cpu_count() or 1
    return max(1, min(configured, files))
