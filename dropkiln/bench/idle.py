"""What an idle daemon costs, and how fast it still reacts.

A real ``dropkiln daemon`` subprocess (default settings) sits with nothing to do; its CPU
time (user + system, all threads, from ``/proc/<pid>/stat``) over a window is the idle
cost, as a share of one core. Then drops arrive one at a time: each is a prompt file the
daemon must reject (no model is needed for that), and the time from its last write to the
``DropRejected`` commit, less ``settle_seconds``, is how long the watcher took to notice
that it had settled. The machine may be busy with other work: the load average before and
after is reported with the figures.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from dropkiln.bench.daemon import start_daemon, stop_daemon
from dropkiln.config import Settings

POLL_S = 0.05


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def bench_idle(seconds: float = 60.0, drops: int = 5, warmup_s: float = 5.0) -> dict[str, Any]:
    """Idle CPU share of a real daemon over ``seconds``, then the drop-to-reaction delay."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dropkiln-idle-") as scratch:
        settings = Settings.load(root=Path(scratch))
        settings.paths.create()
        process = start_daemon(settings, dict(os.environ))
        try:
            time.sleep(warmup_s)  # past the start-up work: reconcile, first telemetry
            cpu_start, wall_start = process_cpu_seconds(process.pid), time.monotonic()
            time.sleep(seconds)
            cpu = process_cpu_seconds(process.pid) - cpu_start
            wall = time.monotonic() - wall_start
            reactions = [_reaction(settings, number) for number in range(drops)]
        finally:
            stop_daemon(process)
    return {
        "window_s": round(wall, 2),
        "cpu_s": round(cpu, 3),
        "idle_core_percent": round(100 * cpu / wall, 3),
        "settle_seconds": settings.settle_seconds,
        "reaction_s": reactions,
        "reaction_p95_s": round(sorted(reactions)[max(0, round(0.95 * len(reactions)) - 1)], 4),
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
