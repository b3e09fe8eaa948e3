"""A real `dropkiln daemon` subprocess on a real SQLite file, for kill -9 and restart tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMALL_CONFIG = """\
settle_seconds = 0.2
telemetry_every_s = 0.5

[bucket]
resolution = 64
bucket_step = 32
min_side = 32
max_side = 128
workers = 1

[train]
steps = 6
checkpoint_every = 2
rank = 4

[generate]
steps = 2
width = 64
height = 64
"""


class DaemonProcess:
    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = {**os.environ, "DROPKILN_SETTLE_SECONDS": "0.2", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "dropkiln.toml"
        if not config.exists():
            config.write_text(SMALL_CONFIG)
        handle = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dropkiln", "daemon", "--root", str(self.root)],
            env={**self.env, **(extra_env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait_serving(self, timeout: float = 30) -> None:
        """Until this process has recorded DaemonStarted."""
        assert self.proc is not None
        pid = self.proc.pid
        self.wait_for(lambda s: s.get("daemon", {}).get("pid") == pid, timeout)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dropkiln", *args, "--root", str(self.root)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json", "--limit", "1000")
        if result.returncode != 0:
            return {"jobs": []}
        return dict(json.loads(result.stdout))

    def events(self) -> list[dict[str, Any]]:
        result = self.cli("events", "--json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def wait_for(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if condition(status):
                return status
            if (
                not self.alive()
                and self.proc is not None
                and self.proc.returncode not in (None, -9)
            ):
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        raise AssertionError(
            f"timed out; last status {status}; log: {self.log.read_text()[-3000:]}"
        )


def all_done(expected_jobs: int) -> Callable[[dict[str, Any]], bool]:
    def done(status: dict[str, Any]) -> bool:
        jobs = status["jobs"]
        terminal = ("succeeded", "failed", "cancelled")
        return len(jobs) >= expected_jobs and all(j["state"] in terminal for j in jobs)

    return done


def terminal_events_per_job(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    ends: dict[str, list[str]] = {}
    for event in events:
        if event["stream"].startswith("job:") and event["type"] in (
            "JobSucceeded",
            "JobFailed",
            "JobCancelled",
        ):
            ends.setdefault(event["stream"][4:], []).append(event["type"])
    return ends
