"""Watch drop/datasets and drop/prompts; hand over an entry once it has settled.

An entry (a file, or a folder at the top level of a drop folder) is settled when its
signature — every file's relative path, size and mtime — has not changed for
``settle_seconds`` and it holds no partial-download file. So a slow copy is never read
half-written, and a folder that is still filling is left alone.
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

PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".!qb", "~")

Signature = tuple[tuple[str, int, int], ...]


def is_partial(name: str) -> bool:
    """Names that copy tools and browsers use while a file is still arriving."""
    return name.startswith(".") or name.endswith(PARTIAL_SUFFIXES)


def signature(entry: Path) -> tuple[Signature, bool]:
    """(signature, holds a partial file). Symlinks are listed, never followed."""
    if entry.is_symlink() or entry.is_file():
        st = entry.lstat()
        return (("", st.st_size, st.st_mtime_ns),), False
    files: list[tuple[str, int, int]] = []
    partial = False
    for folder, dirs, names in os.walk(entry, followlinks=False):
        dirs.sort()
        for name in sorted(names) + [d for d in dirs if Path(folder, d).is_symlink()]:
            path = Path(folder, name)
            partial = partial or is_partial(name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                partial = True
                continue
            files.append((str(path.relative_to(entry)), st.st_size, st.st_mtime_ns))
    return tuple(files), partial


@dataclass
class _Pending:
    signature: Signature
    changed_at: float


class DropWatcher:
    """Yields each settled top-level entry of the watched folders once."""

    def __init__(self, folders: Iterable[Path], settle_seconds: float, tick: float = 0.25) -> None:
        self.folders = list(folders)
        self.settle_seconds = settle_seconds
        # Re-check at least twice per settle window, so a drop is taken soon after it settles.
        self.tick = max(0.02, min(tick, settle_seconds / 2))
        self._pending: dict[Path, _Pending] = {}
        self._handed: set[Path] = set()

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
                if is_partial(entry.name):
                    continue
                present.add(entry)
                if entry in self._handed:
                    continue
                try:
                    sig, partial = signature(entry)
                except FileNotFoundError:
                    continue
                known = self._pending.get(entry)
                if known is None or known.signature != sig or partial:
                    self._pending[entry] = _Pending(sig, now)
                elif now - known.changed_at >= self.settle_seconds:
                    del self._pending[entry]
                    self._handed.add(entry)
                    ready.append(entry)
        # Forget what disappeared (moved away by ingest, or by the user) so a new drop with
        # the same name is seen afresh.
        self._handed &= present
        for gone in set(self._pending) - present:
            del self._pending[gone]
        return ready

    async def settled(self) -> AsyncIterator[Path]:
        """Settled entries, forever. watchfiles wakes us early; a tick re-checks settling."""
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        for entry in self.scan():
            yield entry
        async for _changes in watchfiles.awatch(
            *self.folders,
            debounce=min(100, max(10, int(self.tick * 1000))),
            step=min(50, max(10, int(self.tick * 500))),
            rust_timeout=int(self.tick * 1000),
            yield_on_timeout=True,
            recursive=True,
        ):
            for entry in self.scan():
                yield entry
            await anyio.sleep(0)
