"""HTTP API figures: ``GET /v1/jobs`` latency on a store of 10,000 jobs, and how long an event
takes to reach an SSE client, against the CLI's ``events --follow`` in the same run.

Everything runs as users run it: ``dropkiln serve`` and ``dropkiln events --follow --json``
are subprocesses, the events come from a third process appending at random 10–60 ms
intervals, and each reader's latency is its receive time minus the event's ``at`` (stamped
inside the writer's transaction).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import anyio
import httpx

from dropkiln.api.token import write_token
from dropkiln.bench.stats import percentile
from dropkiln.bench.store import append_paced, make_big_store
from dropkiln.store import EventStore, status_report

PACED_STREAM = "job:paced"


def bench_api(root: Path, jobs: int, requests: int, events: int) -> dict[str, Any]:
    """Make a store of ``jobs`` jobs under ``root``, serve it, and measure."""
    db = root / "state" / "dropkiln.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    total = make_big_store(db, total=jobs * 12, events_per_job=12)
    token = write_token(root / "state" / "api-token")
    figures: dict[str, Any] = {"store_events": total}
    figures["query_s"] = anyio.run(_status_in_process, db, requests)
    with _serving(root) as url:
        figures["list_jobs_s"] = _list_jobs(url, token, requests)
        figures.update(_event_latency(root, url, token, events))
    return figures


async def _status_in_process(db: Path, runs: int) -> list[float]:
    """The baseline: the same read (`status_report`) called directly on an open store."""
    times = []
    async with await EventStore.open(db) as store:
        jobs_found = len((await status_report(store, limit=None))["jobs"])
        assert jobs_found > 0
        for _ in range(runs):
            started = time.perf_counter()
            await status_report(store)
            times.append(time.perf_counter() - started)
    return times


def _list_jobs(url: str, token: str, requests: int) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"}
    times = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(10):  # connection, first queries
            client.get("/v1/jobs").raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get("/v1/jobs")
            response.raise_for_status()
            times.append(time.perf_counter() - started)
            assert len(response.json()["jobs"]) == 50
    return times


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _serving(root: Path) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "dropkiln", "serve", "--root", str(root), "--port", str(port)]
    env = {**os.environ, "DROPKILN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dropkiln serve exited: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("dropkiln serve did not answer within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _latency(line: str, received: float) -> float | None:
    """Receive time minus the event's ``at``, for the paced writer's events only."""
    event = json.loads(line)
    if event.get("stream") != PACED_STREAM:
        return None
    return received - datetime.fromisoformat(event["at"]).timestamp()


def _read_sse(
    url: str, token: str, after: int, count: int, out: list[float], ready: threading.Event
) -> None:
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(after)}
    with httpx.stream("GET", f"{url}/v1/events", headers=headers, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("retry:"):
                ready.set()
            if not line.startswith("data: "):
                continue
            latency = _latency(line[6:], time.time())
            if latency is not None:
                out.append(latency)
                if len(out) == count:
                    return


def _read_cli(stdout: IO[str], count: int, out: list[float]) -> None:
    for line in stdout:
        latency = _latency(line, time.time())
        if latency is not None:
            out.append(latency)
            if len(out) == count:
                return


def _event_latency(root: Path, url: str, token: str, count: int) -> dict[str, Any]:
    db = root / "state" / "dropkiln.db"
    after = anyio.run(_last_seq, db)
    sse: list[float] = []
    cli: list[float] = []
    connected = threading.Event()
    sse_reader = threading.Thread(
        target=_read_sse, args=(url, token, after, count, sse, connected), daemon=True
    )
    command = [sys.executable, "-m", "dropkiln", "events", "--follow", "--json"]
    command += ["--root", str(root), "--since", str(after)]
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert follower.stdout is not None
    cli_reader = threading.Thread(target=_read_cli, args=(follower.stdout, count, cli), daemon=True)
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    writer = context.Process(target=append_paced, args=(str(db), count, go))
    try:
        sse_reader.start()
        cli_reader.start()
        writer.start()
        connected.wait(30)
        time.sleep(2.0)  # the CLI follower has imported and opened the store by now
        go.set()
        for reader in (sse_reader, cli_reader):
            reader.join(timeout=60 + count * 0.2)
    finally:
        writer.join(timeout=30)
        if writer.is_alive():
            writer.kill()
        follower.terminate()
        follower.wait(timeout=20)
        follower.stdout.close()
    if len(sse) < count or len(cli) < count:
        raise RuntimeError(f"only {len(sse)} SSE and {len(cli)} CLI events of {count} arrived")
    return {"sse_latency_s": sse, "cli_latency_s": cli}


async def _last_seq(db: Path) -> int:
    async with await EventStore.open(db) as store:
        return await store.last_seq()


def summary(figures: dict[str, Any]) -> dict[str, float]:
    """The headline numbers in milliseconds."""
    ms = {
        "list_jobs_p50_ms": percentile(figures["list_jobs_s"], 50) * 1000,
        "list_jobs_p99_ms": percentile(figures["list_jobs_s"], 99) * 1000,
        "query_p50_ms": statistics.median(figures["query_s"]) * 1000,
        "sse_p95_ms": percentile(figures["sse_latency_s"], 95) * 1000,
        "cli_p95_ms": percentile(figures["cli_latency_s"], 95) * 1000,
    }
    ms["sse_minus_cli_p95_ms"] = ms["sse_p95_ms"] - ms["cli_p95_ms"]
    return {name: round(value, 2) for name, value in ms.items()}
