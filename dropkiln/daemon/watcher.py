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
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio
import watchfiles

log = logging.getLogger(__name__)

# What browsers (Firefox .part, Chrome .crdownload, Safari .download), download managers
# (.partial, qBittorrent .!qb) and copy tools (.tmp) name a file that is still arriving.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".!qb")
REPORT_AFTER_S = 60.0

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
        tick: float = 0.25,
        report_after: float = REPORT_AFTER_S,
    ) -> None:
        self.folders = list(folders)
        self.settle_seconds = settle_seconds
        self.report_after = report_after
        # Re-check at least twice per settle window, so a drop is taken soon after it settles.
        self.tick = max(0.02, min(tick, settle_seconds / 2))
        self._pending: dict[Path, _Pending] = {}
        # Handed-over entries by their (device, inode): a new entry under a name that was
        # just moved away is new, even if no scan saw the name missing in between.
        self._handed: dict[Path, tuple[int, int]] = {}

    def scan(self, now: float | None = None) -> list[Path]:
        """One pass: update signatures; return entries that have just settled."""
        now = time.monotonic() if now is None else now
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
                known = self._pending.get(entry)
                if known is None:
                    self._pending[entry] = _Pending(sig, now, now, partial)
                elif known.signature != sig or partial:
                    known.signature, known.changed_at, known.partial = sig, now, partial
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

    async def settled(self) -> AsyncIterator[Path | Waiting]:
        """Settled entries (and now and then a Waiting), forever. watchfiles wakes us early;
        a tick re-checks settling."""
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        async for news in self._pass():
            yield news
        async for _changes in watchfiles.awatch(
            *self.folders,
            debounce=min(100, max(10, int(self.tick * 1000))),
            step=min(50, max(10, int(self.tick * 500))),
            rust_timeout=int(self.tick * 1000),
            yield_on_timeout=True,
            recursive=True,
        ):
            async for news in self._pass():
                yield news
            await anyio.sleep(0)

    async def _pass(self) -> AsyncIterator[Path | Waiting]:
        for entry in await anyio.to_thread.run_sync(self.scan):
            yield entry
        for waiting in self.waiting():
            yield waiting
