"""How soon the quick commands answer: `status`, `events` and `cancel`, as users run them.

Each is a fresh ``python -m dropkiln CMD --root ROOT`` process on a store of a few jobs,
wall-clock from spawn to exit, best of ``runs``; the commands take turns with a bare
``python -c pass`` (the floor: the interpreter's own start), so a change in load falls on
all alike. Each command runs once untimed first, and the children run without
``PYTHONDONTWRITEBYTECODE``: a user's second command reads dropkiln's modules from their
cached bytecode, where a shell that sets the variable (some containers and CI images do)
compiles every module of an editable install again on every start, about 0.1 s here.
Goal: each answers in a quarter of a second. The load average before and after is
reported with the figures.

Run ``python -m dropkiln.bench.cli_start [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

JOBS = 20
COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "events": ["events"],
    "cancel": ["cancel", "job00"],
}


def bench_cli_start(runs: int = 7) -> dict[str, Any]:
    """Best-of-``runs`` wall seconds of each quick command and of a bare interpreter."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dropkiln-cli-") as scratch:
        root = Path(scratch)
        anyio.run(_make_store, root / "state" / "dropkiln.db")
        timings: dict[str, list[float]] = {name: [] for name in ("python", *COMMANDS)}
        commands = {
            name: [sys.executable, "-m", "dropkiln", *args, "--root", str(root)]
            for name, args in COMMANDS.items()
        }
        for command in commands.values():
            _wall(command)  # writes the bytecode cache, as any first run does
        for _ in range(runs):
            timings["python"].append(_wall([sys.executable, "-c", "pass"]))
            for name, command in commands.items():
                timings[name].append(_wall(command))
    best = {f"{name}_s": round(min(seconds), 4) for name, seconds in timings.items()}
    return {
        **best,
        "runs": runs,
        "bytecode_cache": "written and read (PYTHONDONTWRITEBYTECODE cleared for the commands)",
        "all_s": timings,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _wall(command: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return time.perf_counter() - started


async def _make_store(path: Path) -> None:
    from dropkiln.store import EventStore
    from dropkiln.store.events import JobSubmitted, job_stream

    path.parent.mkdir(parents=True)
    store = await EventStore.open(path, create=True)
    try:
        for number in range(JOBS):
            job_id = f"job{number:02d}"
            submitted = JobSubmitted(
                job_id=job_id, stage="generate", name=f"prompts-{number}", lane="gpu",
                priority=0, spec={"prompt_file": f"/drop/{number}.toml"},
            )  # fmt: skip
            await store.append(job_stream(job_id), [submitted])
    finally:
        await store.close()


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.cli_start")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(list(argv))
    figures = bench_cli_start(args.runs)
    for name in COMMANDS:
        print(f"{name}: {figures[f'{name}_s']:.3f} s best of {args.runs} (goal <= 0.25 s)")
    print(f"python -c pass: {figures['python_s']:.3f} s; load {figures['load_average_after']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
