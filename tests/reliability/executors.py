"""Several `dropkiln daemon --device cpu:N` processes on one home: executors sharing a store.

Each is started, killed (-9), paused (SIGSTOP) and resumed (SIGCONT) on its own. The store is
read straight from SQLite (``Home``) or from PostgreSQL (``PostgresReader``), never through a
dropkiln process (a Python start per poll would starve the daemons of the box's two cores).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.reliability.home import Home

# Short leases, so a paused executor loses its job within seconds.
LEASES = """
[executor]
lease_seconds = 3
heartbeat_seconds = 0.5
"""

PROMPT_FILE = """\
[defaults]
steps = 2
width = 64
height = 64
seed = {seed}

[[image]]
prompt = "shapes, a red circle number {seed}"
count = 1
name = "picture"

[video]
kind = "slideshow"
fps = 4
seconds_per_image = 0.5
"""
"""Two jobs a file: generate (GPU lane) and video (CPU lane, after it)."""


class PostgresReader:
    """The few reads the tests make, from a PostgreSQL store (the same SQL as Home's)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        try:
            with psycopg.connect(self.url, row_factory=dict_row) as conn:
                return list(conn.execute(sql.replace("?", "%s"), args).fetchall())
        except psycopg.errors.UndefinedTable:
            return []

    def jobs(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM jobs ORDER BY submitted_seq")

    def events_of(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT seq, type, data FROM events WHERE stream = ? ORDER BY seq", (f"job:{job_id}",)
        )
        return [{**row, "data": _decoded(row["data"])} for row in rows]


def _decoded(data: Any) -> Any:
    return json.loads(data) if isinstance(data, str) else data


class Executors:
    """``count`` daemons on ``home``, on devices cpu:0 … cpu:N-1."""

    def __init__(self, home: Home, count: int) -> None:
        self.home = home
        self.devices = [f"cpu:{n}" for n in range(count)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()

    def log_path(self, device: str) -> Path:
        return self.home.root / f"daemon-{device.replace(':', '-')}.log"

    def log(self, device: str) -> str:
        return self.log_path(device).read_text(errors="replace")

    def start(self, device: str) -> None:
        assert not self.alive(device), f"{device} is still running"
        with open(self.log_path(device), "ab") as handle:
            handle.write(f"---- start {device}\n".encode())
            handle.flush()
            command = [sys.executable, "-m", "dropkiln", "daemon", "--root", str(self.home.root)]
            self.procs[device] = subprocess.Popen(
                [*command, "--device", device],
                env=self.home.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def start_all(self) -> None:
        for device in self.devices:
            self.start(device)

    def check(self) -> None:
        """Fail if a daemon exited on its own (not killed by the test, not stopped by it)."""
        for device, proc in self.procs.items():
            if proc.poll() not in (None, -9):
                raise AssertionError(f"{device} exited {proc.returncode}:\n{self.logs()}")

    def holds(self, device: str, pid: int | None) -> bool:
        """Whether ``device``'s daemon is alive and is the process ``pid``."""
        return self.alive(device) and self.procs[device].pid == pid

    def alive(self, device: str) -> bool:
        proc = self.procs.get(device)
        return proc is not None and proc.poll() is None

    def kill(self, device: str) -> None:
        proc = self.procs[device]
        if device in self.paused:
            self.resume(device)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def pause(self, device: str) -> None:
        self.procs[device].send_signal(signal.SIGSTOP)
        self.paused.add(device)

    def resume(self, device: str) -> None:
        self.procs[device].send_signal(signal.SIGCONT)
        self.paused.discard(device)

    def stop_all(self) -> None:
        for device in list(self.paused):
            self.resume(device)
        for device in self.devices:
            if self.alive(device):
                self.procs[device].send_signal(signal.SIGTERM)
        for device in self.devices:
            proc = self.procs.get(device)
            if proc is None:
                continue
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-3000:]
            for path in sorted(self.home.root.glob("daemon-cpu-*.log"))
        )


def drop_prompt_files(home: Home, count: int) -> None:
    for seed in range(1, count + 1):
        staged = home.staging(f"batch-{seed}.toml")
        staged.write_text(PROMPT_FILE.format(seed=seed))
        home.drop(staged, "prompts")


def executor_device(executor: str | None) -> str | None:
    """The device of an executor id (host/device)."""
    return executor.rsplit("/", 1)[-1] if executor else None


ATTEMPT_EVENTS = frozenset(
    {"JobStarted", "JobProgress", "CheckpointSaved", "CheckpointUnusable", "ArtifactWritten"}
    | {"JobSucceeded", "JobFailed", "JobPreempted", "OutOfMemory", "RetryScheduled"}
)
"""What only a running attempt writes (a cancel or a dependency's failure may end a job
that is not running, so JobCancelled is not among them)."""


ATTEMPT_ENDINGS = ("JobSucceeded", "JobFailed", "JobCancelled", "JobPreempted", "RetryScheduled")


def writes_without_a_lease(events: list[dict[str, Any]]) -> list[str]:
    """Events an attempt wrote after its lease was taken from it: between a JobInterrupted
    (the lease was lost, the job requeued) and the next JobClaimed, nothing but the requeue
    or a cancel may follow."""
    found: list[str] = []
    holding = False
    for event in events:
        kind = event["type"]
        if kind == "JobClaimed":
            holding = True
        elif kind == "JobInterrupted":
            holding = False
        elif kind in ATTEMPT_EVENTS and not holding and kind != "JobStarted":
            found.append(f"{kind} (seq {event['seq']}) with no lease held")
        elif kind in ATTEMPT_ENDINGS:
            holding = False
        if kind == "JobStarted" and not holding:
            found.append(f"JobStarted (seq {event['seq']}) without a JobClaimed before it")
    return found
