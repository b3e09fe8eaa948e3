"""Taking a settled drop: record it, plan its jobs, move it out of the drop folder.

The order makes every step crash-safe: the events (Dropped + JobSubmitted, or
DropRejected) are committed first with the destination path, then the drop is renamed
there, then DropMoved is recorded. If the process dies between the commit and DropMoved,
``reconcile`` finishes the move at the next start; a drop with DropMoved is never touched
again, so a new drop that reuses its name is a new drop. A move that fails (a folder the
daemon may not write, EACCES/EPERM) is recorded as DropMoveFailed with the reason, the drop
stays where it is, its jobs wait, and the move is tried again with backoff. Nothing a user
dropped is ever deleted: it ends in processed/ or failed/.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from dropkiln.config import Settings
from dropkiln.daemon.drops import (
    DATASET,
    PROMPTS,
    DropRejection,
    ParsedDrop,
    drop_name,
    error_text,
    new_id,
    parse_drop,
    stored_path,
    unique_path,
)
from dropkiln.daemon.planner import Planner
from dropkiln.stages import fsync_dir, write_atomic
from dropkiln.store import EventStore, StoreError, drop_by_hash, unmoved_drops
from dropkiln.store.events import (
    DropMoveAbandoned,
    DropMoved,
    DropMoveFailed,
    Dropped,
    DropRecognised,
    DropRejected,
    Event,
    drop_stream,
    job_stream,
)
from dropkiln.store.vocabulary import DropState

log = logging.getLogger(__name__)

# A failed move is tried again after 1, 2, 4 … seconds, at most every five minutes: soon
# enough that fixing a folder's permissions is noticed at once, rare enough that a drop
# stuck for days writes a few hundred events a day.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 300.0


@dataclass
class PendingMove:
    """A drop recorded in the store that still has to reach ``stored``."""

    drop_id: str
    source: Path
    stored: Path
    note: str | None = None
    """The NAME.error.txt text of a rejected drop, written beside it first."""
    inode: tuple[int, int] | None = None
    """(device, inode) of the source when it was taken: a different entry at the same path
    later is a new drop, not this one."""
    attempts: int = 0
    due: float = 0.0


class Ingestor:
    def __init__(self, settings: Settings, store: EventStore, planner: Planner) -> None:
        self.settings = settings
        self.store = store
        self.planner = planner
        self.pending: dict[Path, PendingMove] = {}

    def kind_of(self, entry: Path) -> str:
        return DATASET if entry.parent == self.settings.paths.datasets else PROMPTS

    def holds(self, entry: Path) -> bool:
        """Whether ``entry`` is a taken drop still waiting for its move (not a new drop)."""
        move = self.pending.get(entry)
        return move is not None and _inode(entry) == move.inode

    def held_drops(self) -> set[str]:
        """Drops whose move has not finished: their jobs must not start yet, because they
        read the drop from where it is moved to."""
        return {move.drop_id for move in self.pending.values()}

    async def ingest(self, entry: Path) -> str:
        """Take one settled drop; returns its drop id. Never raises for bad input."""
        kind = self.kind_of(entry)
        drop_id = new_id()
        # Where a zip is extracted; removed again unless the drop is taken and planned.
        extracted = self.settings.paths.work / "drops" / drop_id
        inode = _inode(entry)
        try:
            parsed = await anyio.to_thread.run_sync(parse_drop, self.settings, entry, kind, drop_id)
            duplicate = await drop_by_hash(self.store, kind, parsed.content_hash)
            if duplicate is not None:
                await anyio.to_thread.run_sync(_discard, extracted)
                await self._recognise(entry, drop_id, parsed, duplicate["id"], inode)
                return drop_id
            jobs = await self.planner.plan(parsed, drop_id)
        except DropRejection as exc:
            await anyio.to_thread.run_sync(_discard, extracted)
            await self.reject(entry, kind, drop_id, str(exc), inode)
            return drop_id
        except OSError as exc:
            await anyio.to_thread.run_sync(_discard, extracted)
            if not entry.exists():
                log.info("drop %s vanished before it was taken", entry.name)
                return drop_id
            await self.reject(entry, kind, drop_id, f"could not read the drop: {exc}", inode)
            return drop_id
        except Exception as exc:
            # A bug of ours must not stop the daemon or lose the drop: it is kept in
            # failed/ with the error, and can be dropped again once fixed.
            log.exception("could not plan drop %s", entry.name)
            await anyio.to_thread.run_sync(_discard, extracted)
            reason = f"internal error while planning the drop: {type(exc).__name__}: {exc}"
            await self.reject(entry, kind, drop_id, reason, inode)
            return drop_id
        stored = stored_path(self.settings, drop_id, entry)
        dropped = Dropped(
            drop_id=drop_id,
            kind=kind,
            name=parsed.name,
            source=str(entry),
            stored=str(stored),
            hash=parsed.content_hash,
            files=parsed.files,
            bytes=parsed.bytes,
        )
        batch: list[tuple[str, list[Event]]] = [(drop_stream(drop_id), [dropped])]
        batch += [(job_stream(job.job_id), [job]) for job in jobs]
        try:
            await self.store.append_batch(batch)
        except StoreError as exc:
            # An id already taken (a collision, or a bug): nothing was written. Kept in
            # failed/ under a fresh id with the reason, like any drop we could not take.
            log.exception("could not record drop %s", entry.name)
            await anyio.to_thread.run_sync(_discard, extracted)
            reason = f"internal error while recording the drop: {exc}"
            await self.reject(entry, kind, new_id(), reason, inode)
            return drop_id
        log.info(
            "took %s %r as drop %s: %d job(s) %s",
            kind,
            parsed.name,
            drop_id,
            len(jobs),
            " → ".join(f"{j.stage}:{j.job_id}" for j in jobs),
        )
        await self._move(PendingMove(drop_id, entry, stored, inode=inode))
        return drop_id

    async def _recognise(
        self,
        entry: Path,
        drop_id: str,
        parsed: ParsedDrop,
        of: str,
        inode: tuple[int, int] | None,
    ) -> None:
        stored = stored_path(self.settings, drop_id, entry)
        event = DropRecognised(
            drop_id=drop_id,
            kind=parsed.kind,
            name=parsed.name,
            source=str(entry),
            stored=str(stored),
            hash=parsed.content_hash,
            duplicate_of=of,
        )
        await self.store.append(drop_stream(drop_id), [event])
        log.info("drop %r has the same content as drop %s: kept, nothing to do", entry.name, of)
        await self._move(PendingMove(drop_id, entry, stored, inode=inode))

    async def reject(
        self,
        entry: Path,
        kind: str,
        drop_id: str,
        reason: str,
        inode: tuple[int, int] | None = None,
    ) -> None:
        """Record why, then move the drop to failed/ beside NAME.error.txt."""
        # Not a destination that a move still waiting to happen will take.
        taken = {move.stored for move in self.pending.values()}
        failed = unique_path(self.settings.paths.failed / entry.name, taken)
        event = DropRejected(
            drop_id=drop_id,
            kind=kind,
            name=drop_name(entry),
            source=str(entry),
            stored=str(failed),
            reason=reason,
        )
        stored_events = await self.store.append(drop_stream(drop_id), [event])
        log.warning("rejected drop %r: %s", entry.name, reason)
        note = error_text(drop_name(entry), drop_id, reason, stored_events[0].at)
        await self._move(PendingMove(drop_id, entry, failed, note=note, inode=inode))

    async def reconcile(self) -> int:
        """Finish the moves that a crash or a failure left undone; returns how many moved."""
        finished = 0
        for drop in await unmoved_drops(self.store):
            note = None
            if drop["state"] == DropState.FAILED:
                note = error_text(drop["name"], drop["id"], drop["reason"] or "", drop["at"])
            source = Path(drop["source"])
            # Whatever is at the source now is taken to be the drop (its inode was not
            # recorded); from here on a replacement is told apart.
            move = PendingMove(drop["id"], source, Path(drop["stored"]), note, _inode(source))
            if await self._move(move):
                finished += 1
                log.info("finished moving drop %s to %s", drop["id"], drop["stored"])
        return finished

    async def retry_moves(self) -> int:
        """Try again the failed moves that are due; returns how many moved."""
        now = time.monotonic()
        due = [move for move in self.pending.values() if move.due <= now]
        moved = 0
        for move in due:
            moved += await self._move(move)
        return moved

    async def _move(self, move: PendingMove) -> bool:
        """Carry out one move; any OSError is recorded and the move is tried again later."""
        try:
            outcome = await anyio.to_thread.run_sync(_carry_out, move)
        except OSError as exc:
            await self._move_failed(move, exc)
            return False
        self.pending.pop(move.source, None)
        stream = drop_stream(move.drop_id)
        if outcome == MOVED:
            await self.store.append(stream, [DropMoved(stored=str(move.stored))])
            return True
        log.warning("drop %s: %s", move.drop_id, outcome)
        await self.store.append(
            stream, [DropMoveAbandoned(source=str(move.source), reason=outcome)]
        )
        return False

    async def _move_failed(self, move: PendingMove, exc: OSError) -> None:
        move.attempts += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (move.attempts - 1))
        move.due = time.monotonic() + delay
        self.pending[move.source] = move
        log.warning(
            "could not move drop %s (%s) to %s: %s; trying again in %.0f s",
            move.drop_id,
            move.source,
            move.stored,
            exc,
            delay,
        )
        failed = DropMoveFailed(
            source=str(move.source),
            stored=str(move.stored),
            reason=str(exc),
            attempt=move.attempts,
            retry_in_s=delay,
        )
        await self.store.append(drop_stream(move.drop_id), [failed])


MOVED = "moved"


def _carry_out(move: PendingMove) -> str:
    """Write the error note, then rename; MOVED, or why there is nothing left to move.

    Runs in a worker thread (renames and fsyncs may block on a slow disk)."""
    there = os.path.lexists(move.source)
    if not there:
        if os.path.lexists(move.stored):
            return MOVED  # renamed before a crash; only DropMoved was missing
        return "neither the drop nor its stored copy exists any more: nothing to move"
    if move.inode is not None and _inode(move.source) != move.inode:
        return f"{move.source} is another entry now (a new drop of the same name): left to it"
    if move.note is not None:
        _write_error(move.stored, move.note)
    if os.path.lexists(move.stored):
        # os.rename would replace a file there silently; nothing may be lost.
        raise FileExistsError(errno.EEXIST, "the destination already exists", str(move.stored))
    _rename(move.source, move.stored)
    return MOVED


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _discard(extracted: Path) -> None:
    """Remove a zip's extraction that no job will read (the zip itself is kept)."""
    shutil.rmtree(extracted, ignore_errors=True)


def _write_error(failed: Path, note: str) -> None:
    target = failed.with_name(failed.name + ".error.txt")
    failed.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, note)


def _rename(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    fsync_dir(target.parent)
    fsync_dir(source.parent)
