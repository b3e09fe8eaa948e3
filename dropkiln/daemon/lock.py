"""Which daemons may run on a ROOT, with flock(2) locks under state/ held for a process's life.

- ``daemon.lock``: every daemon holds it shared; a command that must have no daemon running
  (``store rebuild``, ``store copy``) takes it exclusively (``DaemonLock``).
- ``daemon-HOST-DEVICE.lock``: one daemon per (ROOT, host, device), exclusively; its id as an
  executor is host/device (``store.leases.executor_id``), so a daemon that holds this lock
  knows that leases under its id belong to a dead predecessor.
- ``intake.lock``: the one daemon that takes drops; the others try again now and then, so
  when its holder dies (the kernel drops a dead process's locks) another takes over.

The kernel releases them all when the process dies, kill -9 included. On a root shared by
several boxes (NFS), flock is forwarded to the server (Linux NFSv4 maps it to byte-range
locks), so the same rules hold across boxes.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path


class AlreadyRunning(RuntimeError):
    """Another daemon holds the lock for this ROOT (or this ROOT and device)."""


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _try_lock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


class DaemonLock:
    """No daemon may run on the ROOT while this is held (exclusive ``daemon.lock``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = _open(self.path)
        if not _try_lock(fd, fcntl.LOCK_EX):
            others = sorted(p.name for p in self.path.parent.glob("daemon-*.lock"))
            os.close(fd)
            raise AlreadyRunning(
                f"a dropkiln daemon is already running on {self.path.parent.parent} "
                f"(device locks: {', '.join(others) or 'none'})"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DaemonLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def device_lock_path(state: Path, device: str, host: str | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host or socket.gethostname()}-{device}")
    return state / f"daemon-{name}.lock"


class ExecutorLock:
    """A daemon's place on the ROOT: ``daemon.lock`` shared and its device's lock exclusive.
    ``alone`` says whether no other daemon ran on the ROOT when it started."""

    def __init__(self, root_lock: Path, device_lock: Path) -> None:
        self.root_lock = root_lock
        self.device_lock = device_lock
        self.alone = False
        self._fds: list[int] = []

    def acquire(self) -> None:
        root = _open(self.root_lock)
        self._fds.append(root)
        # Exclusive first, to learn whether any other daemon runs; else shared, waiting for
        # a daemon that is starting alone (until ``shared``) or a `store rebuild` to finish.
        self.alone = _try_lock(root, fcntl.LOCK_EX)
        if not self.alone:
            fcntl.flock(root, fcntl.LOCK_SH)
        device = _open(self.device_lock)
        self._fds.append(device)
        if not _try_lock(device, fcntl.LOCK_EX):
            holder = _holder(device)
            self.release()
            raise AlreadyRunning(
                f"another dropkiln daemon (pid {holder}) is already running on "
                f"{self.root_lock.parent.parent} with this device ({self.device_lock.name})"
            )
        _write_pid(device)

    def shared(self) -> None:
        """Let other daemons start beside this one (after the start-up that needed it alone)."""
        if self.alone and self._fds:
            fcntl.flock(self._fds[0], fcntl.LOCK_SH)

    def release(self) -> None:
        for fd in reversed(self._fds):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fds = []

    def __enter__(self) -> ExecutorLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class IntakeLock:
    """Held by the one daemon that takes drops; ``try_take`` never waits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_take(self) -> bool:
        if self._fd is not None:
            return True
        fd = _open(self.path)
        if not _try_lock(fd, fcntl.LOCK_EX):
            os.close(fd)
            return False
        _write_pid(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
