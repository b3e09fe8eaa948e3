"""The systemd notify protocol (sd_notify(3)) without libsystemd.

A message is one datagram of newline-separated ``KEY=value`` fields sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract socket. Outside systemd the
variable is unset and every call does nothing, so the daemon calls the notifier unconditionally.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import anyio

log = logging.getLogger(__name__)

__all__ = ["SystemdNotifier", "keep_extending_timeout", "watchdog_loop"]


class SystemdNotifier:
    """Tells systemd that the daemon is ready, what it is doing, that it is alive or stopping."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env)
        self._socket: socket.socket | None = None
        # Status updates come from the event loop and from stage worker threads.
        self._lock = threading.Lock()
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Startup is complete: the daemon is serving (READY=1)."""
        return self.notify("READY=1", *_status_field(status))

    def status(self, text: str) -> bool:
        """One line saying what the daemon is doing, shown by `systemctl status`."""
        return self.notify(*_status_field(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (STOPPING=1)."""
        return self.notify("STOPPING=1", *_status_field(status))

    def reloading(self, status: str | None = None) -> bool:
        """A configuration reload has begun; send ready() when it is done."""
        # systemd uses the timestamp to tell this reload apart from an earlier one.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *_status_field(status))

    def watchdog(self) -> bool:
        """The daemon is alive (WATCHDOG=1)."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the current start or stop timeout kills the daemon."""
        usec = max(1, round(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the unit's WatchdogSec), or None if unwatched."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send fields as one message; False when not under systemd or the socket is gone."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                    # A full receive queue must never block the event loop: drop the message.
                    self._socket.setblocking(False)
                self._socket.sendto(payload, self._address)
            except OSError as error:
                if not self._failing:
                    log.debug("systemd notify socket %r unusable: %s", self._address, error)
                self._failing = True
                return False
            if self._failing:
                log.debug("systemd notify socket %r usable again", self._address)
            self._failing = False
            return True

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def watchdog_loop(
    notifier: SystemdNotifier, hung: Callable[[], str | None] = lambda: None
) -> None:
    """Send WATCHDOG=1 at the interval systemd asked for until cancelled; return if it asked none.

    Run it in the daemon's task group: it is pinged from the event loop, so a loop blocked by
    accident gets the daemon restarted. The loop alone says nothing of the worker threads: a
    GPU thread stuck in a driver call or a stage waiting on a hung subprocess leaves the loop
    free. So ``hung()`` is asked before each ping: while it names something (a stage silent
    for ``stall_after_s``), no ping is sent, and systemd restarts the daemon; its job
    resumes from its last checkpoint.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    reported = None
    while True:
        reason = hung()
        if reason is None:
            notifier.watchdog()
        elif reason != reported:
            log.error("not telling the watchdog we are alive: %s", reason)
            notifier.status(f"hung: {reason}")
        reported = reason
        await anyio.sleep(interval)


@asynccontextmanager
async def keep_extending_timeout(
    notifier: SystemdNotifier,
    seconds: float,
    *,
    progressing: Callable[[], bool] = lambda: True,
    limit_s: float = math.inf,
) -> AsyncIterator[None]:
    """While the body runs, keep systemd's start/stop deadline at least `seconds` ahead, as
    long as ``progressing()`` says the work moves and for at most ``limit_s`` in all.

    For the checkpoint a running job writes on shutdown: the unit's TimeoutStopSec is a bound
    for a hung daemon, not for a large but progressing save. Without progress, or past the
    limit, no more is asked, so systemd's own timeout applies again.
    """
    started = time.monotonic()

    async def extend_until_cancelled() -> None:
        while True:
            await anyio.sleep(seconds / 2)
            if not progressing():
                log.warning("shutdown: no progress; the stop timeout is no longer extended")
                return
            remaining = limit_s - (time.monotonic() - started)
            if remaining <= 0:
                log.warning("shutdown: the stop timeout was extended for %g s; no more", limit_s)
                return
            notifier.extend_timeout(min(seconds, remaining))

    notifier.extend_timeout(min(seconds, limit_s))
    failure: Exception | None = None
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(extend_until_cancelled)
        try:
            yield
        except Exception as error:
            # Raised below, outside the task group, so the caller sees it unwrapped.
            failure = error
        finally:
            task_group.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _socket_address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: a leading NUL instead of a file system path.
        return "\0" + value[1:]
    if value:
        log.debug("NOTIFY_SOCKET=%r is not an AF_UNIX address; systemd notify is off", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        # The watchdog belongs to another process (we were started by the watched one).
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _status_field(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # A newline would end the field and let the rest be read as another assignment.
    return ("STATUS=" + " ".join(text.splitlines()),)
