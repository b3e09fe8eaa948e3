"""Watch drop/datasets and drop/prompts; hand over an entry once it has settled.

An entry (a file, or a folder at the top level of a drop folder) is settled when its
signature — every file's relative path, size and mtime, hidden files included — has not
changed for ``settle_seconds`` and it holds no partial-download file (``*.part``,
``*.crdownload``, ``*.tmp``, …). So a slow copy is never read half-written, and a folder
that is still filling is left alone. Hidden files (``.DS_Store``, ``._x.jpg``,
``__MACOSX/``, ``.thumbnails/``) do not hold a drop: only while one is still changing does
it delay the drop, like any other file. A top-level hidden entry is never a drop (it is a
copy in progress under a temporary name, as ``dropkiln submit`` makes).

A drop held back for ``report_after`` seconds is reported once (``Waiting``) with the
reason, so a stuck drop is never silent. The walks run in a worker thread: a big tree on a
slow disk must not stall the event loop.

Nothing is scanned on a clock while nothing is pending: the kernel's change notifications
(inotify, through watchfiles) wake the watcher, and a pending drop wakes it when it may
have settled. A look every ``FALLBACK_S`` seconds covers filesystems whose changes are not
notified (some network mounts).

watchfiles hands over the kernel's notifications only when its thread wakes, every "step".
While nothing is pending the step is long (``idle_step_ms``: a tenth of the settle time,
at most ``IDLE_STEP_MAX_MS``): a change only has to be noticed well within the settle time,
because settling is timed from the entry's own ctime, not from when it was noticed. While a
drop settles the step is short, so it is handed over within ``SETTLING_STEP_MS`` of settling.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
from watchfiles._rust_notify import RustNotify
from watchfiles.main import _default_force_polling

log = logging.getLogger(__name__)

# What browsers (Firefox .part, Chrome .crdownload, Safari .download), download managers
# (.partial, qBittorrent .!qb) and copy tools (.tmp) name a file that is still arriving.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".!qb")
REPORT_AFTER_S = 60.0
FALLBACK_S = 5.0
# watchfiles wakes every step to look for changes (taking the GIL each time), and a change
# is handed over once a step sees no more: between one and two steps after it happened.
# Idle, a step is a tenth of the settle time (200 ms at the default 2 s: 5 wakes a second);
# while a drop settles, 10 ms keeps pickup close to settle_seconds.
IDLE_STEP_MAX_MS = 500
SETTLING_STEP_MS = 10
DEBOUNCE_MS = 100
# How late a woken thread may run on a loaded machine (2 cores, load 8: a few hundred ms).
BUSY_SLACK_S = 0.5
# How much older than the truth a ctime can look to a scan: the scan reads the monotonic
# clock, then the wall clock, and a thread preempted between the two (a busy machine) sees
# every ctime older by that gap; on kernels whose file times come from the coarse clock, a
# change can also be stamped up to a tick (1-10 ms by CONFIG_HZ) early. Either can put a
# change made just after a scan before that scan.
CTIME_SLACK_S = 0.02

Signature = tuple[tuple[str, int, int], ...]


def is_partial(name: str) -> bool:
    """A partial-download marker: holds the drop it is in, however long it is stable."""
    return name.lower().endswith(PARTIAL_SUFFIXES)


def signature(entry: Path) -> tuple[Signature, str | None]:
    """(signature, the first partial-download file in it, if any). Symlinks are listed,
    never followed."""
    if entry.is_symlink() or entry.is_file():
        st = entry.lstat()
        return (("", st.st_size, st.st_mtime_ns),), entry.name if is_partial(entry.name) else None
    files: list[tuple[str, int, int]] = []
    partial: str | None = None
    for folder, dirs, names in os.walk(entry, followlinks=False):
        dirs.sort()
        for name in sorted(names) + [d for d in dirs if Path(folder, d).is_symlink()]:
            path = Path(folder, name)
            relative = str(path.relative_to(entry))
            if partial is None and is_partial(name):
                partial = relative
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # gone between the listing and now: the next scan sees the change
            files.append((relative, st.st_size, st.st_mtime_ns))
    return tuple(files), partial


def idle_step_ms(settle_seconds: float) -> int:
    """How often watchfiles looks for notifications while no drop is pending."""
    return max(SETTLING_STEP_MS, min(IDLE_STEP_MAX_MS, round(settle_seconds * 100)))


@dataclass(frozen=True)
class Waiting:
    """A drop held back for a while, and why."""

    entry: Path
    reason: str
    waited_s: float


@dataclass
class _Pending:
    signature: Signature
    changed_at: float
    seen_at: float
    partial: str | None = None
    reported: str | None = None  # the reason last reported as Waiting


class DropWatcher:
    """Yields each settled top-level entry of the watched folders once."""

    def __init__(
        self,
        folders: Iterable[Path],
        settle_seconds: float,
        report_after: float = REPORT_AFTER_S,
        fallback_s: float = FALLBACK_S,
    ) -> None:
        self.folders = list(folders)
        self.settle_seconds = settle_seconds
        self.report_after = report_after
        self.fallback_s = fallback_s
        self._pending: dict[Path, _Pending] = {}
        # Handed-over entries by their (device, inode): a new entry under a name that was
        # just moved away is new, even if no scan saw the name missing in between.
        self._handed: dict[Path, tuple[int, int]] = {}
        self._last_scan: float | None = None
        self.idle_step_ms = idle_step_ms(settle_seconds)
        # A change is seen two steps after it happened, or later on a busy machine; the
        # settle clock starts from the entry's own ctime (a rename or a new file sets it),
        # back-dated by no more than that: an older ctime belongs to no change we saw.
        self._max_backdate_s = 2 * self.idle_step_ms / 1000 + BUSY_SLACK_S

    def scan(self, now: float | None = None) -> list[Path]:
        """One pass: update signatures; return entries that have just settled. With ``now``
        given (tests), the settle clock runs on it alone."""
        real_clock = now is None
        now = time.monotonic() if now is None else now
        wall = time.time()
        # A change seen now happened after the last scan looked, and at most two steps ago:
        # an entry's ctime inside that window (less CTIME_SLACK_S) is when
        # it changed; outside it, it says nothing (a file changed deeper in a folder), and
        # the clock starts now.
        floor = now
        if real_clock and self._last_scan is not None:
            floor = max(self._last_scan, now - self._max_backdate_s) - CTIME_SLACK_S
        present: set[Path] = set()
        ready: list[Path] = []
        for folder in self.folders:
            try:
                entries = sorted(folder.iterdir())
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                present.add(entry)
                try:
                    st = entry.lstat()
                except FileNotFoundError:
                    continue
                if self._handed.get(entry) == (st.st_dev, st.st_ino):
                    continue
                try:
                    sig, partial = signature(entry)
                except FileNotFoundError:
                    continue
                changed_at = now - (wall - st.st_ctime_ns / 1e9)
                if not floor <= changed_at <= now:
                    changed_at = now
                known = self._pending.get(entry)
                if known is None:
                    self._pending[entry] = _Pending(sig, changed_at, now, partial)
                elif known.signature != sig or partial:
                    known.signature, known.changed_at, known.partial = sig, changed_at, partial
                elif now - known.changed_at >= self.settle_seconds:
                    del self._pending[entry]
                    self._handed[entry] = (st.st_dev, st.st_ino)
                    ready.append(entry)
        # Forget what disappeared (moved away by ingest, or by the user) so a new drop with
        # the same name is seen afresh.
        for gone in set(self._handed) - present:
            del self._handed[gone]
        for gone in set(self._pending) - present:
            del self._pending[gone]
        if real_clock:
            self._last_scan = now
        return ready

    def waiting(self, now: float | None = None) -> list[Waiting]:
        """Drops held back for ``report_after`` seconds, each reason reported once."""
        now = time.monotonic() if now is None else now
        news: list[Waiting] = []
        for entry, pending in self._pending.items():
            waited = now - pending.seen_at
            if waited < self.report_after:
                continue
            if pending.partial is not None:
                reason = (
                    f"because it holds {pending.partial}, a partial download; "
                    "it is taken once that file is complete (renamed) or removed"
                )
            else:
                reason = (
                    "because it is still changing; it is taken once nothing in it has "
                    f"changed for {self.settle_seconds:g} s"
                )
            if reason != pending.reported:
                pending.reported = reason
                news.append(Waiting(entry, reason, waited))
        return news

    def next_check_in(self, now: float | None = None) -> float | None:
        """Seconds until a pending drop may have settled or is due to be reported; None when
        only a change in the folders can move anything on."""
        now = time.monotonic() if now is None else now
        due: list[float] = []
        for pending in self._pending.values():
            if pending.partial is None:
                due.append(pending.changed_at + self.settle_seconds)
            if pending.reported is None:
                due.append(pending.seen_at + self.report_after)
        return max(0.0, min(due) - now) if due else None

    async def settled(self) -> AsyncIterator[Path | Waiting]:
        """Settled entries (and now and then a Waiting), forever."""
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        paths = [str(folder) for folder in self.folders]
        # What watchfiles.awatch does, but with a timeout chosen per wait (awatch fixes it).
        with RustNotify(paths, False, _default_force_polling(None), 300, True, False) as notify:
            while True:
                async for news in self._pass():
                    yield news
                await self._wait_for_change(notify)

    async def _wait_for_change(self, notify: RustNotify) -> None:
        """Return on a change in the folders, when a pending drop is due, or after
        ``fallback_s``."""
        due = self.next_check_in()
        settling = due is not None
        wait_s = self.fallback_s if due is None else min(due, self.fallback_s)
        # 0 means "no timeout" to watchfiles: a drop already due waits one millisecond.
        timeout_ms = max(1, math.ceil(wait_s * 1000))
        step = SETTLING_STEP_MS if settling else self.idle_step_ms
        stop = threading.Event()
        try:
            await anyio.to_thread.run_sync(
                notify.watch, DEBOUNCE_MS, step, timeout_ms, stop, abandon_on_cancel=True
            )
        finally:
            stop.set()  # a cancelled wait's thread ends at its next step

    async def _pass(self) -> AsyncIterator[Path | Waiting]:
        for entry in await anyio.to_thread.run_sync(self.scan):
            yield entry
        for waiting in self.waiting():
            yield waiting
