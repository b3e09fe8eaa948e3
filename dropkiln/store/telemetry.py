"""The daemon as the store sees it: its lifecycle events and its heartbeat, the device-memory
samples it records (``telemetry``, kept for a retention window, never in the event log)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dropkiln.store import sqlite
from dropkiln.store.eventstore import EventStore, newest_events, stored_events
from dropkiln.store.stored import DAEMON_STREAM

DAEMON_LIFECYCLE = ("DaemonStarted", "DaemonStopping", "DaemonStopped")
IDLE_TELEMETRY_S = 2.5
"""How often an idle daemon samples (``telemetry_every_s`` while a job runs); readers call
the daemon down when its heartbeat is older than HEARTBEAT_TIMEOUT_S."""
HEARTBEAT_TIMEOUT_S = 5.0
"""The daemon samples device memory about once a second (telemetry): that is its
heartbeat. A daemon silent this long is not running, whatever its last event says."""


@dataclass(frozen=True)
class DaemonState:
    """The daemon as its lifecycle events and its heartbeat describe it."""

    last_event: str | None = None
    pid: int | None = None
    host: str | None = None
    device: str | None = None
    root: str | None = None
    last_seen: float | None = None
    """Unix time of the newest telemetry sample (the heartbeat), if any."""

    def seen_ago(self, now: float | None = None) -> float | None:
        """Seconds since the heartbeat, if there was one."""
        if self.last_seen is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.last_seen)

    def running(self, now: float | None = None) -> bool:
        """Started (or stopping) and heard from within HEARTBEAT_TIMEOUT_S."""
        seen = self.seen_ago(now)
        return (
            self.last_event in ("DaemonStarted", "DaemonStopping")
            and seen is not None
            and seen < HEARTBEAT_TIMEOUT_S
        )


async def daemon_state(store: EventStore) -> DaemonState:
    """Up or down, from the lifecycle events and the telemetry heartbeat."""
    lifecycle = newest_events(DAEMON_STREAM, DAEMON_LIFECYCLE, 1)
    started = newest_events(DAEMON_STREAM, ("DaemonStarted",), 1)
    beat = "SELECT at FROM telemetry ORDER BY id DESC LIMIT 1"

    def work(conn: sqlite.Connection) -> DaemonState:
        last = stored_events(conn.execute(*lifecycle))
        start = stored_events(conn.execute(*started))
        seen = conn.execute(beat).fetchone()
        info = start[0].data if start else {}
        return DaemonState(
            last_event=last[0].type if last else None,
            pid=info.get("pid"),
            host=info.get("host"),
            device=info.get("device"),
            root=info.get("root"),
            last_seen=seen[0] if seen else None,
        )

    return await store.snapshot(work)


TELEMETRY_COLUMNS = (
    "at",
    "device",
    "allocated",
    "reserved",
    "peak",
    "free",
    "total",
    "rss",
    "job_id",
    "memory_rung",
    "executor",
    "device_class",
)
_INSERT_SAMPLE = (
    f"INSERT INTO telemetry ({', '.join(TELEMETRY_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in TELEMETRY_COLUMNS)})"
)


@dataclass(frozen=True)
class TelemetrySample:
    """One device-memory sample (bytes; ``rss`` is the process's resident memory)."""

    at: float
    device: str
    allocated: int | None
    reserved: int | None
    peak: int | None
    free: int | None
    total: int | None
    rss: int | None
    job_id: str | None
    memory_rung: int | None
    executor: str | None = None
    """The daemon (host/device) that took it (None: before schema 4)."""
    device_class: str | None = None


async def record_telemetry(store: EventStore, sample: dict[str, Any], retention_s: float) -> None:
    """Store one device-memory sample and drop samples older than the retention window."""
    now = sample.get("at", time.time())
    values = {name: sample.get(name) for name in TELEMETRY_COLUMNS}
    values["at"] = now

    def work(conn: sqlite.Connection) -> None:
        conn.execute(_INSERT_SAMPLE, values)
        conn.execute("DELETE FROM telemetry WHERE at < :before", {"before": now - retention_s})

    await store.transaction(work)


async def recent_telemetry(store: EventStore, seconds: float = 300.0) -> list[TelemetrySample]:
    """The samples of the last ``seconds`` before the newest one, oldest first (a stopped
    daemon's last minutes stay visible)."""
    sql = (
        f"SELECT {', '.join(TELEMETRY_COLUMNS)} FROM telemetry "
        "WHERE at >= (SELECT max(at) FROM telemetry) - :seconds ORDER BY id"
    )
    rows = await store.snapshot(lambda conn: conn.execute(sql, {"seconds": seconds}).fetchall())
    return [TelemetrySample(*row) for row in rows]


async def device_rooms(store: EventStore, within_s: float) -> list[TelemetrySample]:
    """Each executor's newest sample of the last ``within_s`` seconds (by this machine's
    clock): the executors alive now, and how much memory their device has free."""
    sql = (
        f"SELECT {', '.join(TELEMETRY_COLUMNS)} FROM telemetry "
        "WHERE at >= :since AND executor IS NOT NULL ORDER BY id DESC"
    )
    since = time.time() - within_s
    rows = await store.snapshot(lambda conn: conn.execute(sql, {"since": since}).fetchall())
    newest: dict[str, TelemetrySample] = {}
    for row in rows:
        sample = TelemetrySample(*row)
        assert sample.executor is not None
        newest.setdefault(sample.executor, sample)
    return list(newest.values())
