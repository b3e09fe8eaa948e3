"""Claim figures: jobs claimed per second and claim latency with several executor processes.

Each executor is a process of its own with its own store, as each daemon is, and runs the
claim loop a daemon's scheduler runs: read the first queued jobs in scheduling order, claim
the first still free (``store.leases.claim``: JobClaimed + JobStarted under a lease, with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL), until none is left. They all read the same head
of the queue, so they contend for the same jobs as real executors do. A claim's latency runs
from the first read to the committed claim, retries after losing a race included.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import anyio

from dropkiln.store import events as ev
from dropkiln.store.backend import open_store
from dropkiln.store.events import job_stream
from dropkiln.store.leases import Candidate, claim, executor_id, queued_jobs
from dropkiln.store.vocabulary import Lane

HEAD = 4
"""Queued jobs an executor reads per try; the scheduler reads them all, the bench the head."""
LEASE_S = 60.0


async def submit_jobs(db: Path, url: str, count: int) -> None:
    """``count`` queued jobs without dependencies, in one transaction."""
    store = await open_store(db, url, create=True)
    try:
        batch = [
            (
                job_stream(f"c{n}"),
                [
                    ev.JobSubmitted(
                        job_id=f"c{n}",
                        stage="generate",
                        name=f"c{n}",
                        lane=Lane.GPU,
                        priority=0,
                        spec={},
                    ),
                    ev.JobQueued(),
                ],
            )
            for n in range(count)
        ]
        await store.append_batch(batch)
    finally:
        await store.close()


def run_claimers(db: Path, url: str, count: int, jobs: int) -> dict[str, Any]:
    """``count`` executor processes claim ``jobs`` queued jobs until none is left."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(count + 1)
    results: Queue[tuple[list[float], int]] = context.Queue()
    procs = [
        context.Process(target=_claimer, args=(str(db), url, f"cpu:{i}", ready, results))
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    ready.wait(timeout=120)
    started = time.perf_counter()
    latencies: list[float] = []
    lost = 0
    for _ in procs:
        mine, races = results.get(timeout=600)
        latencies.extend(mine)
        lost += races
    wall = time.perf_counter() - started
    for proc in procs:
        proc.join(timeout=30)
    if len(latencies) != jobs:
        raise RuntimeError(f"{len(latencies)} claims for {jobs} jobs: a job was claimed twice")
    cuts = statistics.quantiles(latencies, n=20)
    return {
        "claims_per_s": round(jobs / wall, 1),
        "p95_ms": round(cuts[18] * 1000, 2),
        "lost_races": lost,
        "latencies": latencies,
    }


def _claimer(db: str, url: str, device: str, ready: Barrier, results: Queue[Any]) -> None:
    anyio.run(_claim_all, Path(db), url, device, ready, results)


async def _claim_all(db: Path, url: str, device: str, ready: Barrier, results: Queue[Any]) -> None:
    store = await open_store(db, url)
    executor = executor_id(device, host="bench")
    try:
        await queued_jobs(store, HEAD)  # warm the connection and the thread pool
        await anyio.to_thread.run_sync(ready.wait)
        latencies: list[float] = []
        races = 0
        while True:
            started = time.perf_counter()
            claimed = None
            while claimed is None:
                head = await queued_jobs(store, HEAD)
                if not head:
                    break
                candidates = [
                    Candidate(
                        job_id,
                        version,
                        attempt + 1,
                        [ev.JobStarted(attempt=attempt + 1, memory_rung=0)],
                    )
                    for job_id, version, attempt in head
                ]
                claimed = await claim(store, candidates, executor, LEASE_S)
                races += claimed is None
            if claimed is None:
                break
            latencies.append(time.perf_counter() - started)
        results.put((latencies, races))
    finally:
        await store.close()
