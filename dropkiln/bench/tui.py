"""Dashboard figures: start-up to first full render on a big store, and event-to-screen latency.

Run ``python -m dropkiln.bench.tui`` (``--events 100000`` for a quick run). Start-up is
measured in fresh processes, from process creation to the first refresh after the jobs,
memory and event log are on screen; the baselines are a bare Textual app started the same
way and the dashboard on an empty store (so the ratio shows what the log's size costs).
Latency: another process appends an event and notes the time of its commit; the dashboard,
running here, is watched until the event's line is in the log and its job row shows it.
The ratio is against the poll interval, the latency's floor by design.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dropkiln.bench.stats import percentile
from dropkiln.store.vocabulary import JobState

EVENTS_PER_JOB = 100
POLL_INTERVAL = 0.1
PROBE_DEADLINE_S = 20.0


def bench_tui(
    *,
    events: int = 1_000_000,
    runs: int = 3,
    samples: int = 30,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Start-up (median of ``runs``) on a store of ``events`` events, and latency."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        figures: dict[str, Any] = {"cpus": os.cpu_count(), "events": events}
        started = time.perf_counter()
        made = make_store(root / "big" / "state" / "dropkiln.db", events)
        figures["store_make_s"] = round(time.perf_counter() - started, 1)
        figures["store_mb"] = round(made.stat().st_size / 2**20, 1)
        empty = make_store(root / "empty" / "state" / "dropkiln.db", 0)
        # The big store was just written: flush it, warm the caches once, then take turns so
        # that other load on the machine falls on all three alike.
        os.sync()
        probe(made)
        big, small, bare = [], [], []
        for _ in range(runs):
            big.append(probe(made))
            small.append(probe(empty))
            bare.append(probe(made, bare=True))
        figures["startup_s"] = _median(big, "first_render_s")
        figures["startup_cpu_s"] = _median(big, "first_render_cpu_s")
        figures["startup_empty_store_cpu_s"] = _median(small, "first_render_cpu_s")
        figures["startup_bare_textual_cpu_s"] = _median(bare, "first_render_cpu_s")
        figures["startup_in_app_s"] = _median(big, "in_app_s")
        figures["startup_empty_store_s"] = _median(small, "first_render_s")
        figures["startup_bare_textual_s"] = _median(bare, "first_render_s")
        figures["heavy_modules_imported"] = big[0]["heavy_modules"]
        figures.update(asyncio.run(_latency(made, samples)))
    figures["startup_vs_bare_textual"] = round(
        figures["startup_s"] / figures["startup_bare_textual_s"], 2
    )
    figures["startup_vs_empty_store"] = round(
        figures["startup_s"] / figures["startup_empty_store_s"], 2
    )
    figures["latency_median_vs_poll"] = round(
        figures["latency_median_ms"] / 1000 / POLL_INTERVAL, 2
    )
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return figures


def _median(results: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in results), 3)


# The store --------------------------------------------------------------------------------


def make_store(path: Path, events: int) -> Path:
    """A store of about ``events`` events (jobs of EVENTS_PER_JOB each, the newest running)
    and its projections, written in bulk in one transaction into the schema the real store
    makes (appending them one by one would take minutes)."""
    from dropkiln.store import EventStore

    async def create() -> None:
        store = await EventStore.open(path, create=True)
        try:
            await store.transaction(functools.partial(_fill, events))
        finally:
            await store.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(create())
    return path


def _fill(events: int, conn: Any) -> None:
    jobs = events // EVENTS_PER_JOB
    start = datetime.now(UTC) - timedelta(seconds=max(jobs, 1) * 60)
    daemon = {"pid": 1, "host": "bench", "version": "0", "device": "cpu", "root": "/"}
    conn.execute(INSERT_EVENT, ("daemon", 1, "DaemonStarted", json.dumps(daemon), _iso(start)))
    for first in range(0, jobs, 500):
        batch = [
            _job(index, start + timedelta(seconds=index * 60), running=index == jobs - 1)
            for index in range(first, min(first + 500, jobs))
        ]
        conn.executemany(INSERT_EVENT, [row for job in batch for row in job.events])
        conn.executemany(_insert("jobs", JOB_COLUMNS), [job.row for job in batch])
        conn.executemany(
            _insert("artifacts", ARTIFACT_COLUMNS), [a for job in batch for a in job.artifacts]
        )
    now = time.time()
    conn.executemany(
        "INSERT INTO telemetry (at, device, allocated, reserved, peak, free, total, rss) "
        "VALUES (?, 'cpu', ?, ?, ?, ?, ?, ?)",
        [(now - 300 + s, 2**30, 2**30, 2**31, 2**34, 2**35, 2**30) for s in range(300)],
    )


INSERT_EVENT = "INSERT INTO events (stream, version, type, data, at) VALUES (?, ?, ?, ?, ?)"
JOB_COLUMNS = (
    "id", "stage", "name", "drop_id", "lane", "priority", "depends_on", "spec", "rung_key",
    "state", "attempt", "memory_rung", "done", "total", "metrics", "checkpoint", "result",
    "error", "requested", "submitted_seq", "version", "created_at", "started_at",
    "finished_at", "updated_at",
)  # fmt: skip
ARTIFACT_COLUMNS = ("job_id", "path", "seq", "kind", "bytes", "sha256", "at")


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="microseconds")


def job_id(index: int) -> str:
    return f"job{index:09d}"


@dataclass
class BenchJob:
    events: list[tuple[Any, ...]]
    row: tuple[Any, ...]
    artifacts: list[tuple[Any, ...]]


def _job(index: int, at: datetime, running: bool) -> BenchJob:
    """A training job's events and the projection rows they make (what a replay makes)."""
    ident, iso = job_id(index), _iso(at)
    submitted_seq = 2 + index * EVENTS_PER_JOB
    steps = EVENTS_PER_JOB - (3 if running else 5)
    total = steps * 2 if running else steps
    spec = {"steps": total}
    data: list[tuple[str, dict[str, Any]]] = [
        ("JobSubmitted", {
            "job_id": ident, "stage": "train", "name": f"set{index}", "lane": "gpu",
            "priority": 10, "spec": spec, "depends_on": [], "drop_id": None,
            "rung_key": None, "memory_rung": 0,
        }),
        ("JobQueued", {"reason": "submitted"}),
        ("JobStarted", {"attempt": 1, "memory_rung": 0, "rung_name": "default"}),
    ]  # fmt: skip
    metrics: dict[str, Any] = {}
    for step in range(1, steps + 1):
        metrics = {"loss": round(0.1 + 1 / step, 6), "it_s": 3.0, "eta_s": total - step}
        data.append(("JobProgress", {"done": step, "total": total, "metrics": metrics}))
    artifacts = []
    if not running:
        artifact = {"path": f"/out/{ident}.safetensors", "kind": "lora", "bytes": None}
        data.append(("ArtifactWritten", {**artifact, "sha256": None}))
        data.append(("JobSucceeded", {"result": {}}))
        artifact_seq = submitted_seq + len(data) - 2
        artifacts.append((ident, artifact["path"], artifact_seq, "lora", None, None, iso))
    events = [
        (f"job:{ident}", version, type_name, json.dumps(d), iso)
        for version, (type_name, d) in enumerate(data, start=1)
    ]
    row = (
        ident, "train", f"set{index}", None, "gpu", 10, "[]", json.dumps(spec), None,
        JobState.RUNNING if running else JobState.SUCCEEDED, 1, 0, steps, total,
        json.dumps(metrics),
        None, None if running else "{}", None, None, submitted_seq, len(data), iso, iso,
        None if running else iso, iso,
    )  # fmt: skip
    return BenchJob(events, row, artifacts)


# Start-up ---------------------------------------------------------------------------------


def probe(db_path: Path, *, bare: bool = False, size: str = "120x40") -> dict[str, Any]:
    """Start the dashboard (or a bare Textual app) in a fresh process; its report."""
    command = [sys.executable, "-m", "dropkiln.bench.tui", "--probe", str(db_path), "--size", size]
    if bare:
        command.append("--bare")
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    report = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    if "error" in report:
        raise RuntimeError(f"the dashboard did not start on {db_path}: {report['error']}")
    return report


def _since_process_start() -> tuple[float, float]:
    """Wall-clock and CPU seconds since this process was created (CPU time is what other
    load on the machine changes least)."""
    now, cpu = time.time(), time.process_time()
    import psutil  # after reading the clocks: its import is not the dashboard's start-up

    return now - psutil.Process().create_time(), cpu


def run_probe(db_path: Path, bare: bool, size: tuple[int, int]) -> dict[str, Any]:
    """In the probe process: run headless until the first full render, then report."""
    from textual.app import App, ComposeResult
    from textual.widgets import Static

    in_app = time.perf_counter()
    report: dict[str, Any] = {}

    def rendered(app: App[Any]) -> None:
        wall, cpu = _since_process_start()
        report["first_render_s"], report["first_render_cpu_s"] = round(wall, 4), round(cpu, 4)
        report["in_app_s"] = round(time.perf_counter() - in_app, 4)
        app.exit()

    app: App[Any]
    if bare:

        class Bare(App[None]):
            def compose(self) -> ComposeResult:
                yield Static("dropkiln")

        app = Bare()
    else:
        from dropkiln.tui import DropkilnApp

        app = DropkilnApp(db_path)

    async def until_rendered(pilot: Any) -> None:
        deadline = time.monotonic() + PROBE_DEADLINE_S
        while not (bare or _fully_shown(app)):
            if time.monotonic() > deadline:
                report["error"] = getattr(app, "problem", None) or "no full render in time"
                app.exit()
                return
            # Coarse enough not to load the process it measures; fine enough for its figure.
            await asyncio.sleep(0.005)
        app.call_after_refresh(rendered, app)

    app.run(headless=True, size=size, auto_pilot=until_rendered)
    report["jobs"] = len(getattr(app, "jobs", ()))
    heavy = ("torch", "diffusers", "transformers", "peft", "accelerate")
    report["heavy_modules"] = [name for name in heavy if name in sys.modules]
    return report


def _fully_shown(app: Any) -> bool:
    from dropkiln.tui.widgets import EventLog, JobsTable

    if not app.loaded:
        return False
    screen = app.screen
    log, table = screen.query_one(EventLog), screen.query_one(JobsTable)
    has_events = app.events_read == 0 or bool(log.lines)
    return has_events and table.row_count == len(app.jobs)


# Latency ----------------------------------------------------------------------------------

APPENDER = """
import asyncio, sys, time
from dropkiln.store import EventStore
from dropkiln.store.events import JobProgress

async def main(path, stream):
    async with await EventStore.open(path) as store:
        for line in sys.stdin:
            done = int(line)
            await store.append(stream, [JobProgress(done=done, total=10**6, metrics={})])
            print(time.monotonic(), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def _latency(db_path: Path, samples: int) -> dict[str, Any]:
    from dropkiln.tui import DropkilnApp
    from dropkiln.tui.widgets import EventLog, JobsTable

    app = DropkilnApp(db_path, poll_interval=POLL_INTERVAL)
    latencies: list[float] = []
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + PROBE_DEADLINE_S
        while not _fully_shown(app):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start on {db_path}: {app.problem}")
            await pilot.pause(0.01)
        stream_job = next(job.id for job in app.jobs if job.state == JobState.RUNNING)
        appender = await asyncio.create_subprocess_exec(
            sys.executable, "-c", APPENDER, str(db_path), f"job:{stream_job}",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert appender.stdin is not None and appender.stdout is not None
        log, table = app.screen.query_one(EventLog), app.screen.query_one(JobsTable)
        for sample in range(samples):
            done = 1000 + sample
            appender.stdin.write(f"{done}\n".encode())
            await appender.stdin.drain()
            committed = float((await appender.stdout.readline()).decode())
            marker = f"JobProgress {done}/1000000"
            while not (
                log.lines
                and marker in log.lines[-1].text
                and table.get_cell(stream_job, "step") == f"{done}/1000000"
            ):
                await asyncio.sleep(0.005)
            latencies.append(time.monotonic() - committed)
            # Space samples out so each one lands at a random point of the poll cycle.
            await asyncio.sleep(POLL_INTERVAL * (0.37 + (sample % 7) / 10))
        appender.stdin.close()
        await appender.wait()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "latency_samples": len(ms),
        "latency_median_ms": round(statistics.median(ms), 1),
        "latency_p95_ms": round(percentile(ms, 95), 1),
        "latency_max_ms": round(ms[-1], 1),
        "poll_interval_ms": POLL_INTERVAL * 1000,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.tui", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="120x40", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        width, height = (int(x) for x in args.size.split("x"))
        print(json.dumps(run_probe(args.probe, args.bare, (width, height))))
        return
    figures = bench_tui(events=args.events, runs=args.runs, samples=args.samples)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
