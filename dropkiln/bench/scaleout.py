"""Scale-out figures, with 1, 2 and 4 processes, on the SQLite store and on PostgreSQL, in
one run: events appended per second and append latency; jobs claimed per second and claim
latency (``claims``).

Each writer is a process of its own with its own store, as each daemon of a scaled-out
setup is, and appends single-event commits to its own job stream (a running attempt's
reports). PostgreSQL is a throwaway server started here from the distribution's programs
(fsync on, as in production), on loopback. ``python -m dropkiln.bench.scaleout``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import anyio

from dropkiln.bench.claims import run_claimers, submit_jobs
from dropkiln.bench.pgserver import PostgresServer
from dropkiln.bench.profile import Profiler
from dropkiln.bench.record import SuiteRecord
from dropkiln.bench.suites import BenchOptions
from dropkiln.store import events as ev
from dropkiln.store.backend import open_store
from dropkiln.store.events import job_stream

WRITERS = (1, 2, 4)
BACKENDS = ("sqlite", "postgres")


def bench_scaleout(
    *, commits: int = 400, claims: int = 400, writers: Sequence[int] = WRITERS
) -> dict[str, Any]:
    """Every (backend, process count) pair; figures keyed ``{backend}_{n}w_…`` (appends) and
    ``{backend}_{n}x_…`` (claims by n executors of ``claims`` queued jobs)."""
    figures: dict[str, Any] = {
        "commits_per_writer": commits,
        "claimed_jobs": claims,
        "writers": list(writers),
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
    }
    server = PostgresServer.start(durable=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backend in BACKENDS:
                for count in writers:
                    db = Path(tmp) / f"{backend}-{count}" / "state" / "dropkiln.db"
                    url = server.create_database() if backend == "postgres" else ""
                    anyio.run(_create, db, url)
                    run = _run_writers(db, url, count, commits)
                    figures[f"{backend}_{count}w_events_per_s"] = run["events_per_s"]
                    figures[f"{backend}_{count}w_append_p95_ms"] = run["p95_ms"]
                    figures[f"{backend}_{count}w_append_s"] = run["latencies"]
                for count in writers:
                    db = Path(tmp) / f"{backend}-claims-{count}" / "state" / "dropkiln.db"
                    url = server.create_database() if backend == "postgres" else ""
                    anyio.run(submit_jobs, db, url, claims)
                    run = run_claimers(db, url, count, claims)
                    figures[f"{backend}_{count}x_claims_per_s"] = run["claims_per_s"]
                    figures[f"{backend}_{count}x_claim_p95_ms"] = run["p95_ms"]
                    figures[f"{backend}_{count}x_lost_races"] = run["lost_races"]
                    figures[f"{backend}_{count}x_claim_s"] = run["latencies"]
    finally:
        server.stop()
    figures["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    figures["postgres_vs_sqlite_1w"] = round(
        figures[f"postgres_{writers[0]}w_events_per_s"]
        / figures[f"sqlite_{writers[0]}w_events_per_s"],
        3,
    )
    return figures


def scaleout_suite(options: BenchOptions, profiler: Profiler | None) -> SuiteRecord:
    """Appends/s and append p95 with 1, 2 and 4 writer processes, claims/s and claim p95 with
    1, 2 and 4 executor processes; SQLite and PostgreSQL."""
    size = options.pick(options.events, 400, 100)
    config: dict[str, Any] = {"commits": size, "claims": size}
    figures = bench_scaleout(**config)
    record = SuiteRecord("scaleout", config=config)
    for backend in BACKENDS:
        for count in WRITERS:
            key = f"{backend}_{count}w"
            what = f"one single-event append, {count} writer process(es), {backend}"
            record.latencies(f"{key}_append", figures.pop(f"{key}_append_s"), what)
            record.metric(
                f"{key}_events_per_s", figures[f"{key}_events_per_s"], "events/s", "higher",
                headline=True,
            )  # fmt: skip
            key = f"{backend}_{count}x"
            what = f"one job claimed, {count} executor process(es) contending, {backend}"
            record.latencies(f"{key}_claim", figures.pop(f"{key}_claim_s"), what)
            record.metric(
                f"{key}_claims_per_s", figures[f"{key}_claims_per_s"], "jobs/s", "higher",
                headline=True,
            )  # fmt: skip
    record.compared(
        "the SQLite store, one writer",
        figures["postgres_vs_sqlite_1w"],
        "PostgreSQL appends/s ÷ SQLite appends/s",
    )
    record.raw = figures
    return record


async def _create(db: Path, url: str) -> None:
    store = await open_store(db, url, create=True)
    await store.close()


def _run_writers(db: Path, url: str, count: int, commits: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(count + 1)
    results: Queue[tuple[list[float], float]] = context.Queue()
    procs = [
        context.Process(target=_writer, args=(str(db), url, f"w{i}", commits, ready, results))
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    ready.wait(timeout=120)  # every writer has opened its store and warmed up
    started = time.perf_counter()
    latencies: list[float] = []
    for _ in procs:
        mine, _finished = results.get(timeout=600)
        latencies.extend(mine)
    wall = time.perf_counter() - started
    for proc in procs:
        proc.join(timeout=30)
    cuts = statistics.quantiles(latencies, n=20)
    return {
        "events_per_s": round(count * commits / wall, 1),
        "p95_ms": round(cuts[18] * 1000, 2),
        "latencies": latencies,
    }


def _writer(
    db: str,
    url: str,
    name: str,
    commits: int,
    ready: Barrier,
    results: Queue[tuple[list[float], float]],
) -> None:
    anyio.run(_append_all, Path(db), url, name, commits, ready, results)


async def _append_all(
    db: Path,
    url: str,
    name: str,
    commits: int,
    ready: Barrier,
    results: Queue[tuple[list[float], float]],
) -> None:
    store = await open_store(db, url)
    try:
        stream = job_stream(name)
        for _ in range(20):  # warm the connection, the thread pool and the statement cache
            await store.append(stream, [ev.JobProgress(done=0, total=commits)])
        await anyio.to_thread.run_sync(ready.wait)
        latencies = []
        for done in range(commits):
            started = time.perf_counter()
            await store.append(stream, [ev.JobProgress(done=done, total=commits)])
            latencies.append(time.perf_counter() - started)
        results.put((latencies, time.perf_counter()))
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=400)
    parser.add_argument("--claims", type=int, default=400)
    args = parser.parse_args()
    figures = bench_scaleout(commits=args.commits, claims=args.claims)
    shown = {k: v for k, v in figures.items() if not k.endswith(("_append_s", "_claim_s"))}
    print(json.dumps(shown, indent=1))


if __name__ == "__main__":
    main()
