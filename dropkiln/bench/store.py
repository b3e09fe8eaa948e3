"""Event store figures: commits/s, batched events/s, cross-process tail latency, status time.

Run ``python -m dropkiln.bench.store`` (``--status-events 100000`` for a quick run).
The baseline is plain sqlite3 in the same process: the same INSERT and COMMIT with the
same pragmas, on the event loop's thread, with no projections, no JSON and no thread hop.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import anyio

from dropkiln.bench.stats import percentile
from dropkiln.store import EventStore, StoredEvent, daemon_state, list_jobs, queue_paused
from dropkiln.store import events as ev
from dropkiln.store.events import DAEMON_STREAM, job_stream
from dropkiln.store.migrate import ensure_schema
from dropkiln.store.projections import apply, changes_for
from dropkiln.store.sqlite import Connection, Database, connect

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def bench_store(
    *,
    single: int = 3000,
    batches: int = 100,
    batch_size: int = 100,
    tail_samples: int = 200,
    status_events: int = 1_000_000,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Measure the store (runs its own event loops); ``status_events`` sizes the big store."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        figures: dict[str, Any] = {"cpus": os.cpu_count()}
        figures.update(anyio.run(_writes, root / "writes.db", single, batches, batch_size))
        figures.update(_baseline_commits(root / "baseline.db", single))
        figures.update(anyio.run(tail_latency, root / "tail.db", tail_samples))
        started = time.perf_counter()
        made = make_big_store(root / "big.db", status_events)
        figures["big_store_events"] = made
        figures["big_store_make_s"] = round(time.perf_counter() - started, 1)
        figures["big_store_mb"] = round((root / "big.db").stat().st_size / 2**20, 1)
        figures.update(anyio.run(_status, root / "big.db"))
        figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    figures["single_vs_sqlite"] = round(
        figures["single_commits_per_s"] / figures["sqlite_commits_per_s"], 3
    )
    return figures


async def _writes(path: Path, single: int, batches: int, batch_size: int) -> dict[str, Any]:
    store = await EventStore.open(path, create=True)
    try:
        await store.append(job_stream("bench"), [_submitted("bench")])
        for _ in range(50):  # warm the thread pool and the statement cache
            await store.append(DAEMON_STREAM, [ev.QueuePaused()])
        commit_s = []
        for _ in range(single):
            started = time.perf_counter()
            await store.append(DAEMON_STREAM, [ev.QueuePaused()])
            commit_s.append(time.perf_counter() - started)
        commits = single / sum(commit_s)
        # Commits an irreversible step follows are fsynced (synchronous=FULL): their price.
        durable = max(1, single // 5)
        started = time.perf_counter()
        for i in range(durable):
            await store.append(job_stream("bench"), [ev.CheckpointSaved(state={"step": i})])
        durable_rate = durable / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(single):
            await store.append(job_stream("bench"), [ev.JobProgress(done=i, total=single)])
        projected = single / (time.perf_counter() - started)
        batch = [ev.JobProgress(done=i, total=batch_size) for i in range(batch_size)]
        started = time.perf_counter()
        for _ in range(batches):
            await store.append(job_stream("bench"), batch)
        batched = batches * batch_size / (time.perf_counter() - started)
    finally:
        await store.close()
    return {
        "single_commits_per_s": round(commits),
        "durable_commits_per_s": round(durable_rate),
        "projected_commits_per_s": round(projected),
        "batched_events_per_s": round(batched),
        "single_commit_s": commit_s,
    }


def _baseline_commits(path: Path, count: int) -> dict[str, float]:
    conn = connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY, stream TEXT, version INTEGER, "
            "type TEXT, data TEXT, at TEXT, UNIQUE (stream, version))"
        )
        started = time.perf_counter()
        for version in range(1, count + 1):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO events (stream, version, type, data, at) VALUES (?, ?, ?, ?, ?)",
                ("daemon", version, "QueuePaused", '{"by": "cli"}', "now"),
            )
            conn.execute("COMMIT")
        return {"sqlite_commits_per_s": round(count / (time.perf_counter() - started))}
    finally:
        conn.close()


async def tail_latency(path: Path, samples: int) -> dict[str, Any]:
    """A tail here, the writer in another process: from its transaction to delivery."""
    store = await EventStore.open(path, create=True)
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    writer = context.Process(target=append_paced, args=(str(path), samples, go))
    latencies: list[float] = []
    tail = store.tail(stream=job_stream("paced"))
    try:
        writer.start()
        with anyio.fail_after(60 + samples * 0.2):
            async with anyio.create_task_group() as group:

                async def receive() -> None:
                    async for event in tail:
                        # ``at`` is stamped in the writer, inside its transaction.
                        sent = datetime.fromisoformat(event.at).timestamp()
                        latencies.append(time.time() - sent)
                        if len(latencies) == samples:
                            return

                group.start_soon(receive)
                await anyio.sleep(0.2)
                go.set()
    finally:
        await tail.aclose()
        writer.join(timeout=30)
        if writer.is_alive():
            writer.kill()
        await store.close()
    return {
        "tail_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "tail_p95_ms": round(percentile(latencies, 95) * 1000, 1),
        "tail_max_ms": round(max(latencies) * 1000, 1),
        "tail_latency_s": latencies,
    }


def append_paced(path: str, count: int, go: ProcessEvent) -> None:
    """In the writer process: once ``go`` is set, append at random 10–60 ms intervals."""
    go.wait()

    async def run() -> None:
        store = await EventStore.open(Path(path))
        try:
            for i in range(count):
                await anyio.sleep(random.uniform(0.01, 0.06))
                await store.append(job_stream("paced"), [ev.JobProgress(done=i, total=count)])
        finally:
            await store.close()

    anyio.run(run)


def _submitted(job_id: str, depends_on: Sequence[str] = ()) -> ev.JobSubmitted:
    return ev.JobSubmitted(
        job_id=job_id,
        stage="train",
        name=f"dataset-{job_id}",
        lane="gpu",
        priority=0,
        spec={"dataset": f"/srv/drop/{job_id}", "steps": 2000, "resolution": 1024},
        depends_on=list(depends_on),
        rung_key="tiny-sdxl/train/1024",
    )


def _job_history(job_id: str, progress: int, ending: ev.Event | None) -> list[ev.Event]:
    history: list[ev.Event] = [_submitted(job_id), ev.JobQueued()]
    if ending is None and progress == 0:
        return history
    history.append(ev.JobStarted(attempt=1, memory_rung=0))
    for step in range(progress):
        metrics = {"loss": round(1 / (step + 1), 6), "lr": 1e-4, "it_s": 3.2}
        # Valid by construction; validating a million of them would dominate the set-up.
        history.append(
            ev.JobProgress.model_construct(done=step + 1, total=progress, metrics=metrics)
        )
        if step % 250 == 249:
            history.append(ev.CheckpointSaved(state={"step": step + 1, "files": ["lora.st"]}))
    if ending is not None:
        path = f"outputs/loras/{job_id}/lora.safetensors"
        history += [ev.ArtifactWritten(path=path, kind="lora"), ending]
    return history


class _BulkLog:
    """Appends histories with executemany; projections get what a live append writes.

    Of a run of JobProgress events only the last one's projection survives (each sets
    the same columns), so only that one is applied.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.seq = 0
        self.versions: dict[str, int] = {}
        self.rows: list[tuple[str, int, str, str, str]] = []

    def add(self, stream: str, history: list[ev.Event]) -> None:
        at = (EPOCH + timedelta(milliseconds=self.seq)).isoformat(timespec="microseconds")
        version = self.versions.get(stream, 0)
        for index, event in enumerate(history):
            self.seq += 1
            version += 1
            self.rows.append((stream, version, event.type_name(), event.model_dump_json(), at))
            upcoming = history[index + 1] if index + 1 < len(history) else None
            if isinstance(event, ev.JobProgress) and isinstance(upcoming, ev.JobProgress):
                continue
            data = event.model_dump(mode="json")
            stored = StoredEvent(self.seq, stream, version, event.type_name(), data, at)
            apply(self.conn, changes_for(stored))
        self.versions[stream] = version
        if len(self.rows) > 50_000:
            self.flush()

    def flush(self) -> None:
        self.conn.executemany(
            "INSERT INTO events (stream, version, type, data, at) VALUES (?, ?, ?, ?, ?)",
            self.rows,
        )
        self.rows.clear()


def make_big_store(path: Path, total: int, events_per_job: int = 200) -> int:
    """A store of ``total`` events (jobs of about ``events_per_job``), made in bulk."""
    database = Database(path)
    ensure_schema(database, create=True)
    database.close()
    conn = connect(path)
    log = _BulkLog(conn)
    conn.execute("BEGIN IMMEDIATE")
    started = ev.DaemonStarted(pid=1234, host="gpu-box", version="0.1", device="cuda", root="/")
    log.add(DAEMON_STREAM, [started])
    index = 0
    while log.seq < total - 30:
        job_id = f"{index:08x}"
        failed = ev.JobFailed(reason="out of memory on every rung")
        ending = failed if index % 10 == 9 else ev.JobSucceeded(result={"lora": job_id})
        progress = min(events_per_job, total - log.seq - 30) - 7
        log.add(job_stream(job_id), _job_history(job_id, max(progress, 0), ending))
        if index % 500 == 250:
            log.add(DAEMON_STREAM, [ev.QueuePaused(), ev.QueueResumed()])
        index += 1
    # Unfinished work on top: one job running, one queued, one waiting for the running one.
    log.add(job_stream("run00001"), _job_history("run00001", 5, None))
    log.add(job_stream("que00001"), _job_history("que00001", 0, None))
    log.add(job_stream("wait0001"), [_submitted("wait0001", ["run00001"]), ev.JobQueued()])
    log.flush()
    conn.execute("COMMIT")
    now = time.time()
    conn.executemany(
        "INSERT INTO telemetry (at, device, allocated, reserved, peak, free, total) "
        "VALUES (?, 'cuda', 1, 2, 3, 4, 5)",
        [(now - age,) for age in range(3600, -1, -1)],
    )
    conn.close()
    return log.seq


async def _status(path: Path, runs: int = 7) -> dict[str, Any]:
    """`dropkiln status`: open, the newest 50 jobs, the daemon, the queue, close."""
    command, everything = [], []
    jobs: list[Any] = []
    for _ in range(runs):
        started = time.perf_counter()
        store = await EventStore.open(path)
        try:
            await list_jobs(store, limit=50)
            await daemon_state(store)
            await queue_paused(store)
            command.append(time.perf_counter() - started)
            # The same with every job listed: the most a caller can ask for.
            started = time.perf_counter()
            jobs = await list_jobs(store)
            await daemon_state(store)
            await queue_paused(store)
            everything.append(time.perf_counter() - started)
        finally:
            await store.close()
    return {
        "status_s": round(statistics.median(command), 4),
        "status_first_s": round(command[0], 4),
        "status_all_jobs_s": round(statistics.median(everything), 4),
        "status_jobs": len(jobs),
        "status_run_s": command,
    }


def report(figures: dict[str, Any], batch_size: int) -> list[tuple[str, str, str]]:
    """The table rows: what was measured, the figure, the issue's goal."""
    f = figures
    return [
        ("single commits/s (QueuePaused)", f"{f['single_commits_per_s']:,}", ">= 2,000"),
        ("single commits/s (JobProgress + projection)", f"{f['projected_commits_per_s']:,}", ""),
        ("durable commits/s (CheckpointSaved, fsynced)", f"{f['durable_commits_per_s']:,}", ""),
        (f"batched events/s ({batch_size} per commit)", f"{f['batched_events_per_s']:,}", ""),
        ("baseline: bare sqlite3 commits/s", f"{f['sqlite_commits_per_s']:,}", ""),
        ("  single commits / baseline", f"{f['single_vs_sqlite']:.2f}", ""),
        ("tail latency, other process, p50 ms", f"{f['tail_p50_ms']}", ""),
        ("tail latency, other process, p95 ms", f"{f['tail_p95_ms']}", "< 100"),
        ("tail latency, other process, max ms", f"{f['tail_max_ms']}", ""),
        (f"status on {f['big_store_events']:,} events s", f"{f['status_s']}", "< 0.2"),
        ("  first run s", f"{f['status_first_s']}", ""),
        (f"  listing all {f['status_jobs']:,} jobs s", f"{f['status_all_jobs_s']}", ""),
        (f"  big store {f['big_store_mb']} MB, made in s", f"{f['big_store_make_s']}", ""),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.store", description=__doc__)
    parser.add_argument("--single", type=int, default=3000, help="single-event commits")
    parser.add_argument("--batches", type=int, default=100, help="batched transactions")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch")
    parser.add_argument("--tail-samples", type=int, default=200, help="cross-process events")
    parser.add_argument("--status-events", type=int, default=1_000_000, help="big store size")
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores go")
    args = parser.parse_args(argv)
    figures = bench_store(
        single=args.single,
        batches=args.batches,
        batch_size=args.batch_size,
        tail_samples=args.tail_samples,
        status_events=args.status_events,
        workdir=args.workdir,
    )
    rows = report(figures, args.batch_size)
    width = max(len(name) for name, _, _ in rows)
    print(f"{'event store':<{width}}  {'figure':>9}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:>9}  {goal}")
    print(f"{figures['cpus']} CPUs, load average after the runs: {figures['load_average_after']}")
    samples = ("single_commit_s", "tail_latency_s", "status_run_s")
    print(json.dumps({k: v for k, v in figures.items() if k not in samples}))


if __name__ == "__main__":
    main()
