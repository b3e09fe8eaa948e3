"""A dropkiln home driven by a real `dropkiln daemon` subprocess, read straight from SQLite.

Polling through `dropkiln status` would start a Python process five times a second on a
machine whose two cores the daemon needs; reading the projections with sqlite3 (WAL: a
reader never blocks the daemon) costs a millisecond.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")
TERMINAL_EVENTS = ("JobSucceeded", "JobFailed", "JobCancelled")

CONFIG = """\
settle_seconds = 0.2
telemetry_every_s = 0.5
poll_interval = 0.05

[bucket]
resolution = 64
bucket_step = 32
min_side = 32
max_side = 128
workers = 1

[train]
steps = 8
checkpoint_every = 2
rank = 4
learning_rate = 1e-3

[generate]
steps = 3
width = 64
height = 64
"""


class Home:
    """ROOT with its config, a daemon subprocess (started and stopped at will) and readers."""

    def __init__(self, root: Path, config: str = CONFIG, env: dict[str, str] | None = None) -> None:
        self.root = root
        # One intra-op thread: the suite shares two busy cores, where OpenMP's spinning
        # threads make tiny-model steps many times slower (and the reference run uses the
        # same, so outputs compare bit for bit).
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.env.pop("DROPKILN_FAULTS", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"
        self.starts = 0
        root.mkdir(parents=True, exist_ok=True)
        (root / "dropkiln.toml").write_text(config)
        for sub in ("drop/datasets", "drop/prompts", "staging"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # The daemon --------------------------------------------------------------------------

    def start(self, faults: str = "") -> None:
        """Start `dropkiln daemon`; ``faults`` arms DROPKILN_FAULTS for this process only."""
        assert not self.alive(), "the previous daemon is still running"
        env = dict(self.env)
        if faults:
            env["DROPKILN_FAULTS"] = faults
        with open(self.log, "ab") as handle:
            handle.write(f"---- start {self.starts + 1} faults={faults!r}\n".encode())
            handle.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dropkiln", "daemon", "--root", str(self.root)],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 120) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop the daemon however it is (tests end with this in a finally)."""
        if self.alive():
            try:
                self.terminate(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # Reading the store -------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        db = self.root / "state" / "dropkiln.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(db, timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def jobs(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM jobs ORDER BY submitted_seq")
        jobs = []
        for row in rows:
            job = dict(row)
            for key in ("depends_on", "spec", "metrics", "checkpoint", "result"):
                if job[key] is not None:
                    job[key] = json.loads(job[key])
            jobs.append(job)
        return jobs

    def drops(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._query("SELECT * FROM drops ORDER BY at")]

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT seq, stream, version, type, data, at FROM events WHERE seq > ? ORDER BY seq",
            (after,),
        )
        return [{**dict(row), "data": json.loads(row["data"])} for row in rows]

    def events_of(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT seq, type, data FROM events WHERE stream = ? ORDER BY seq", (f"job:{job_id}",)
        )
        return [{**dict(row), "data": json.loads(row["data"])} for row in rows]

    def last_seq(self) -> int:
        rows = self._query("SELECT coalesce(max(seq), 0) AS seq FROM events")
        return int(rows[0]["seq"]) if rows else 0

    def started_seq(self) -> int:
        """The seq of the newest DaemonStarted: where the running daemon's life began."""
        rows = self._query("SELECT max(seq) AS seq FROM events WHERE type = 'DaemonStarted'")
        return int(rows[0]["seq"] or 0) if rows else 0

    def serving_pid(self) -> int | None:
        rows = self._query(
            "SELECT type, data FROM events WHERE stream = 'daemon' AND type LIKE 'Daemon%' "
            "ORDER BY seq DESC LIMIT 1"
        )
        if rows and rows[0]["type"] == "DaemonStarted":
            return int(json.loads(rows[0]["data"])["pid"])
        return None

    # Waiting -----------------------------------------------------------------------------

    def wait_for(
        self, condition: Callable[[Home], bool], timeout: float, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self):
                return
            if self.proc is not None and self.proc.poll() not in (None, 0, -signal.SIGKILL):
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} while waiting for {what}:\n"
                    + self.log_text()[-4000:]
                )
            time.sleep(0.1)
        states = [(j["stage"], j["name"], j["state"], j["error"]) for j in self.jobs()]
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}; jobs {states}\n"
            + self.log_text()[-4000:]
        )

    def wait_serving(self, timeout: float = 60) -> None:
        assert self.proc is not None
        pid = self.proc.pid
        self.wait_for(lambda h: h.serving_pid() == pid, timeout, "DaemonStarted")

    def wait_all_done(self, jobs: int, timeout: float) -> list[dict[str, Any]]:
        """Until ``jobs`` jobs exist and every one has ended; returns them."""

        def done(home: Home) -> bool:
            found = home.jobs()
            return len(found) >= jobs and all(j["state"] in TERMINAL for j in found)

        self.wait_for(done, timeout, f"{jobs} jobs to end")
        return self.jobs()

    # Dropping ----------------------------------------------------------------------------

    def drop(self, built: Path, kind: str) -> Path:
        """Move a finished drop from staging into view in one rename, as a careful user does."""
        folder = self.root / "drop" / ("datasets" if kind == "dataset" else "prompts")
        target = folder / built.name
        os.rename(built, target)
        return target

    def staging(self, name: str) -> Path:
        path = self.root / "staging" / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        return path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dropkiln", *args, "--root", str(self.root)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def terminal_events(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """job id → the terminal event types recorded for it, in order."""
    ends: dict[str, list[str]] = {}
    for event in events:
        if event["stream"].startswith("job:") and event["type"] in TERMINAL_EVENTS:
            ends.setdefault(event["stream"][4:], []).append(event["type"])
    return ends
