"""What an idle daemon costs, and how fast it still reacts.

A real ``dropkiln daemon`` subprocess (default settings) sits with nothing to do; its CPU
time (user + system, all threads, from ``/proc/<pid>/stat``) over a window is the idle
cost, as a share of one core, with each thread's share (``/proc/<pid>/task``, named by
``py-spy dump`` where it is installed). Then it must react, one thing at a time:
- drops: each is a prompt file the daemon must reject (no model is needed for that), and
  the time from its last write to the ``DropRejected`` commit, less ``settle_seconds``, is
  how long the watcher took to notice that it had settled;
- jobs another process writes: this process submits a job that depends on a failed one,
  and the time from its ``JobSubmitted`` commit to the daemon's ``JobFailed`` is how long
  its tail and scheduler took to see it (no model is needed either).
The machine may be busy with other work: the load average before and after is reported
with the figures.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from dropkiln.bench.daemon_process import start_daemon, stop_daemon
from dropkiln.bench.stats import percentile
from dropkiln.config import Settings

POLL_S = 0.05


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread's (kernel name, user + system clock ticks), from /proc."""
    ticks: dict[int, tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        ticks[int(task.name)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def python_threads(pid: int) -> dict[int, str]:
    """Python thread names and where each waits, by thread id (``py-spy dump``); empty
    without py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True)
    threads: dict[int, str] = {}
    lines = dump.stdout.splitlines()
    for number, line in enumerate(lines):
        found = re.match(r'Thread (\d+) \(\w+\): "(.*)"', line)
        if found:
            frame = lines[number + 1].strip() if number + 1 < len(lines) else ""
            threads[int(found.group(1))] = f"{found.group(2)} in {frame}"
    return threads


def bench_idle(
    seconds: float = 60.0, drops: int = 5, jobs: int = 5, warmup_s: float = 5.0
) -> dict[str, Any]:
    """Idle CPU share of a real daemon over ``seconds`` (per thread too), then the
    drop-to-reaction and job-to-reaction delays."""
    load_before = os.getloadavg()
    tick = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="dropkiln-idle-") as scratch:
        settings = Settings.load(root=Path(scratch))
        settings.paths.create()
        process = start_daemon(settings, dict(os.environ))
        try:
            time.sleep(warmup_s)  # past the start-up work: reconcile, first telemetry
            threads_start = thread_ticks(process.pid)
            cpu_start, wall_start = process_cpu_seconds(process.pid), time.monotonic()
            time.sleep(seconds)
            cpu = process_cpu_seconds(process.pid) - cpu_start
            wall = time.monotonic() - wall_start
            threads_end = thread_ticks(process.pid)
            names = python_threads(process.pid)
            reactions = [_reaction(settings, number) for number in range(drops)]
            pickups = anyio.run(_job_reactions, settings, jobs)
        finally:
            stop_daemon(process)
    threads = []
    for tid, (name, ticks) in sorted(threads_end.items()):
        used = ticks - threads_start.get(tid, (name, 0))[1]
        if used:
            threads.append(
                {
                    "thread": names.get(tid, name),
                    "ticks": used,
                    "core_percent": round(100 * used / tick / wall, 3),
                }
            )
    return {
        "window_s": round(wall, 2),
        "warmup_s": warmup_s,
        "cpu_s": round(cpu, 3),
        "idle_core_percent": round(100 * cpu / wall, 3),
        "threads": sorted(threads, key=lambda t: -t["ticks"]),
        "clock_ticks_per_s": tick,
        "settle_seconds": settings.settle_seconds,
        "reaction_s": reactions,
        "reaction_p95_s": round(percentile(reactions, 95), 4),
        "job_reaction_s": pickups,
        "job_reaction_p95_s": round(percentile(pickups, 95), 4),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _reaction(settings: Settings, number: int) -> float:
    """Seconds from a rejected drop's last write to its DropRejected, less the settle time."""
    name = f"idle-{number:02d}.toml"
    staged = settings.root / name
    staged.write_text("this is = not [valid toml\n")
    target = settings.paths.prompts / name
    os.rename(staged, target)  # the last write: the drop appears whole
    written = time.time()
    deadline = time.monotonic() + settings.settle_seconds + 30
    while time.monotonic() < deadline:
        at = anyio.run(_rejected_at, settings, str(target))
        if at is not None:
            return round(at - written - settings.settle_seconds, 4)
        time.sleep(POLL_S)
    raise RuntimeError(f"the daemon never rejected {target}")


async def _rejected_at(settings: Settings, source: str) -> float | None:
    from dropkiln.store import EventStore

    store = await EventStore.open(settings.paths.db)
    try:
        for event in await store.last(types=["DropRejected"], limit=20):
            if event.data.get("source") == source:
                return datetime.fromisoformat(event.at).timestamp()
    finally:
        await store.close()
    return None


async def _job_reactions(settings: Settings, count: int) -> list[float]:
    """Seconds from a job's JobSubmitted, written here, to the daemon's JobFailed for it:
    each depends on a job that failed already, so the daemon's first look ends it."""
    from dropkiln.store import EventStore
    from dropkiln.store.events import JobFailed, JobSubmitted, job_stream

    def submitted(job_id: str, depends_on: list[str]) -> JobSubmitted:
        return JobSubmitted(
            job_id=job_id,
            stage="generate",
            name=f"idle-{job_id}",
            lane="gpu",
            priority=0,
            spec={},
            depends_on=depends_on,
        )

    store = await EventStore.open(settings.paths.db)
    delays: list[float] = []
    try:
        for _ in range(count):
            await anyio.sleep(1.0)  # the daemon is idle again, waiting
            failed, job_id = f"idle-failed-{uuid.uuid4().hex[:8]}", f"idle-{uuid.uuid4().hex[:8]}"
            ending = JobFailed(reason="failed on purpose, so the job after it cannot run")
            await store.append(job_stream(failed), [submitted(failed, []), ending])
            sent = await store.append(job_stream(job_id), [submitted(job_id, [failed])])
            with anyio.fail_after(30):
                while not (ended := await store.last(job_stream(job_id), types=["JobFailed"])):
                    await anyio.sleep(POLL_S / 5)
            delays.append(round(_at(ended[0].at) - _at(sent[0].at), 4))
    finally:
        await store.close()
    return delays


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
