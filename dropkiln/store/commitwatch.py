"""Waking a tail when the SQLite file gets a commit, from this process or another.

Every commit writes the WAL (or, outside WAL mode, the database file), and the kernel says
so; the newest event's ``seq`` then tells a commit that appended events from one that did
not (a telemetry sample, a lease renewal, a checkpoint). The wait runs in one worker thread
and wakes the event loop only when there are new events to read.

On Linux the thread blocks on an inotify descriptor (``inotify_simple``): it does not run at
all while nothing is written, and a commit is seen as soon as the thread is scheduled.
Elsewhere watchfiles hands the notifications over at its next polling step (``STEP_MS``),
so there the step is what an idle tail costs. Where notifications do not reach (some
network filesystems) the watch looks every ``poll_interval`` seconds anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sqlite3
import threading
from pathlib import Path
from typing import Literal, Protocol

from dropkiln.store.errors import StoreError

log = logging.getLogger(__name__)

Notice = Literal["ours", "other", "timeout", "interrupted"]
"""What one wait for the folder saw: a write to one of the database's files (``ours``),
to another file only, nothing, or an interruption (a cancel or close)."""

STEP_MS = 40
"""watchfiles' polling step, where there is no inotify: a commit is seen 40 to 80 ms after
it (the tail's goal: p95 < 100 ms), for 25 wakes a second of a thread that does nothing
else."""
DEBOUNCE_MS = 50
"""watchfiles groups the notifications of one commit (WAL writes, then the -shm index)."""
LOOK_AGAIN_MS = (5, 25, 100)
"""A commit's frames reach the WAL (the kernel's notice) just before the commit is marked
in the shared-memory index, which no notice follows: when a notice finds no new event, the
watch looks again after each of these pauses unless another notice comes first."""
NEWEST_SEQ = "SELECT coalesce(max(seq), 0) FROM events"


class FolderNotices(Protocol):
    def wait(self, timeout_ms: int) -> Notice: ...
    def interrupt(self) -> None: ...
    def close(self) -> None: ...


class KernelNotices:
    """inotify on the database's folder (the WAL comes and goes, so not on its files)."""

    def __init__(self, folder: Path, prefix: str) -> None:
        from inotify_simple import INotify, flags

        self._prefix = prefix
        self._lost = flags.Q_OVERFLOW | flags.IGNORED
        self._inotify = INotify()
        try:
            self._inotify.add_watch(folder, flags.MODIFY | flags.CREATE | flags.MOVED_TO)
        except BaseException:
            self._inotify.close()
            raise
        # A cancelled or closed watch writes here to end the wait at once.
        self._interrupt_read, self._interrupt_write = os.pipe()
        os.set_blocking(self._interrupt_write, False)
        self._poller = select.poll()
        self._poller.register(self._inotify.fileno(), select.POLLIN)
        self._poller.register(self._interrupt_read, select.POLLIN)

    def wait(self, timeout_ms: int) -> Notice:
        ready = {fd for fd, _ in self._poller.poll(timeout_ms)}
        if self._interrupt_read in ready:
            os.read(self._interrupt_read, 4096)
            return "interrupted"
        if not ready:
            return "timeout"
        events = self._inotify.read(timeout=0)
        # An overflowed queue lost notices, and a removed watch gives no more: look anyway.
        if any(event.mask & self._lost for event in events):
            return "ours"
        names = [event.name for event in events]
        return "ours" if any(name.startswith(self._prefix) for name in names) else "other"

    def interrupt(self) -> None:
        # A full pipe holds interruptions enough.
        with contextlib.suppress(BlockingIOError):
            os.write(self._interrupt_write, b"x")

    def close(self) -> None:
        self._inotify.close()
        os.close(self._interrupt_read)
        os.close(self._interrupt_write)


class PolledNotices:
    """watchfiles' polling step, for systems without inotify."""

    def __init__(self, folder: Path, prefix: str) -> None:
        from watchfiles._rust_notify import RustNotify
        from watchfiles.main import _default_force_polling

        self._prefix = prefix
        self._notify = RustNotify(
            [str(folder)], False, _default_force_polling(None), 300, False, False
        )
        self._interrupted = threading.Event()

    def wait(self, timeout_ms: int) -> Notice:
        changes = self._notify.watch(DEBOUNCE_MS, STEP_MS, timeout_ms, self._interrupted)
        if changes == "stop":
            self._interrupted.clear()
            return "interrupted"
        if not isinstance(changes, set):
            return "timeout"
        names = [Path(changed).name for _, changed in changes]
        return "ours" if any(name.startswith(self._prefix) for name in names) else "other"

    def interrupt(self) -> None:
        self._interrupted.set()

    def close(self) -> None:
        self._notify.close()


def folder_notices(folder: Path, prefix: str) -> FolderNotices:
    """The kernel's notices where it gives them (Linux), else watchfiles' polling."""
    try:
        return KernelNotices(folder, prefix)
    except (ImportError, AttributeError, OSError) as error:
        # Not Linux (no inotify_init1 in the C library), or out of inotify instances.
        log.info("commit watch on %s polls every %d ms: %s", folder, STEP_MS, error)
        return PolledNotices(folder, prefix)


class CommitWatch:
    """Wakes a tail when another connection commits (see the module docstring)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, poll_interval: float) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._poll_ms = max(1, round(poll_interval * 1000))
        # Kept open for the whole tail: a commit made while the tail reads a batch is already
        # noted when it waits again.
        self._notices: FolderNotices | None = folder_notices(path.parent, path.name)
        self._lock = threading.Lock()
        # One wait at a time: a cancelled wait's thread ends before the next one waits, so it
        # cannot take the next one's notices.
        self._one_wait = threading.Lock()
        self._waiting = False
        self._closed = False

    async def version(self) -> int:
        """The newest event's seq as this connection sees it."""
        import anyio.to_thread

        version = await anyio.to_thread.run_sync(self._newest_seq)
        if version is None:
            raise StoreError(f"the watch on {self.path} is closed")
        return version

    async def changed_since(self, version: int) -> None:
        """Return once the database has an event newer than ``version`` (a seq)."""
        import anyio.to_thread

        stop = threading.Event()
        waited = False
        try:
            await anyio.to_thread.run_sync(
                self._wait_for_commit, version, stop, abandon_on_cancel=True
            )
            waited = True
        finally:
            stop.set()
            if not waited:
                self._interrupt()  # a cancelled wait's thread ends now

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            waiting = self._waiting
        self._interrupt()
        if not waiting:
            self._close_notices()
        # else the waiting thread closes them as it leaves

    def _wait_for_commit(self, version: int, stop: threading.Event) -> None:
        with self._one_wait:
            with self._lock:
                if self._closed or self._notices is None:
                    return
                self._waiting = True
                notices = self._notices
            try:
                self._wait(notices, version, stop)
            finally:
                with self._lock:
                    self._waiting = False
                    closed = self._closed
                if closed:
                    self._close_notices()

    def _wait(self, notices: FolderNotices, version: int, stop: threading.Event) -> None:
        look_again: list[int] = []
        notice: Notice = "ours"  # an event may have come since the version was read
        while not stop.is_set():
            if notice in ("ours", "timeout"):
                newest = self._newest_seq()
                if newest is None or newest > version:
                    return
                # A write but no new event yet (it may not be marked committed yet), or a
                # commit of no event: look again shortly.
                if notice == "ours":
                    look_again = list(LOOK_AGAIN_MS)
            notice = notices.wait(look_again.pop(0) if look_again else self._poll_ms)

    def _interrupt(self) -> None:
        with self._lock:
            if self._notices is not None:
                self._notices.interrupt()

    def _close_notices(self) -> None:
        with self._lock:
            notices, self._notices = self._notices, None
        if notices is not None:
            notices.close()

    def _newest_seq(self) -> int | None:
        """None once the watch is closed."""
        with self._lock:
            if self._conn is None:
                return None
            return int(self._conn.execute(NEWEST_SEQ).fetchone()[0])
