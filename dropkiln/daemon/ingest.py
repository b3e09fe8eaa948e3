"""Taking a settled drop: record it, plan its jobs, move it out of the drop folder.

The order makes every step crash-safe: the events (Dropped + JobSubmitted, or
DropRejected) are committed first with the destination path, then the drop is renamed
there. If the process dies between the two, ``reconcile`` finishes the move at the next
start. Nothing a user dropped is ever deleted: it ends in processed/ or failed/.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio

from dropkiln.config import Settings
from dropkiln.daemon.planner import (
    DATASET,
    PROMPTS,
    DropRejection,
    ParsedDrop,
    Planner,
    drop_name,
    error_text,
    fsync_dir,
    new_id,
    parse_drop,
    stored_path,
    unique_path,
)
from dropkiln.stages import write_atomic
from dropkiln.store import EventStore, drop_by_hash, list_drops
from dropkiln.store.events import (
    Dropped,
    DropRecognised,
    DropRejected,
    Event,
    drop_stream,
    job_stream,
)

log = logging.getLogger(__name__)


class Ingestor:
    def __init__(self, settings: Settings, store: EventStore, planner: Planner) -> None:
        self.settings = settings
        self.store = store
        self.planner = planner

    def kind_of(self, entry: Path) -> str:
        return DATASET if entry.parent == self.settings.paths.datasets else PROMPTS

    async def ingest(self, entry: Path) -> str:
        """Take one settled drop; returns its drop id. Never raises for bad input."""
        kind = self.kind_of(entry)
        drop_id = new_id()
        try:
            parsed = await anyio.to_thread.run_sync(parse_drop, self.settings, entry, kind, drop_id)
            duplicate = await drop_by_hash(self.store, kind, parsed.content_hash)
            if duplicate is not None:
                await self._recognise(entry, drop_id, parsed, duplicate["id"])
                return drop_id
            jobs = await self.planner.plan(parsed, drop_id)
        except DropRejection as exc:
            await self.reject(entry, kind, drop_id, str(exc))
            return drop_id
        except OSError as exc:
            if not entry.exists():
                log.info("drop %s vanished before it was taken", entry.name)
                return drop_id
            await self.reject(entry, kind, drop_id, f"could not read the drop: {exc}")
            return drop_id
        except Exception as exc:
            # A bug of ours must not stop the daemon or lose the drop: it is kept in
            # failed/ with the error, and can be dropped again once fixed.
            log.exception("could not plan drop %s", entry.name)
            reason = f"internal error while planning the drop: {type(exc).__name__}: {exc}"
            await self.reject(entry, kind, drop_id, reason)
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
        await self.store.append_batch(batch)
        _move(entry, stored)
        log.info(
            "took %s %r as drop %s: %d job(s) %s",
            kind,
            parsed.name,
            drop_id,
            len(jobs),
            " → ".join(f"{j.stage}:{j.job_id}" for j in jobs),
        )
        return drop_id

    async def _recognise(self, entry: Path, drop_id: str, parsed: ParsedDrop, of: str) -> None:
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
        _move(entry, stored)
        log.info("drop %r has the same content as drop %s: kept, nothing to do", entry.name, of)

    async def reject(self, entry: Path, kind: str, drop_id: str, reason: str) -> None:
        """Record why, then move the drop to failed/ beside NAME.error.txt."""
        failed = unique_path(self.settings.paths.failed / entry.name)
        event = DropRejected(
            drop_id=drop_id,
            kind=kind,
            name=drop_name(entry),
            source=str(entry),
            stored=str(failed),
            reason=reason,
        )
        stored_events = await self.store.append(drop_stream(drop_id), [event])
        _write_error(failed, drop_name(entry), drop_id, reason, stored_events[0].at)
        _move(entry, failed)
        log.warning("rejected drop %r: %s", entry.name, reason)

    async def reconcile(self) -> int:
        """Finish moves that a crash interrupted; returns how many were finished."""
        finished = 0
        for drop in await list_drops(self.store, limit=1000):
            source, stored = Path(drop["source"]), Path(drop["stored"] or "")
            if drop["stored"] and source.exists() and not stored.exists():
                if drop["state"] == "failed":
                    _write_error(stored, drop["name"], drop["id"], drop["reason"] or "", drop["at"])
                _move(source, stored)
                finished += 1
                log.info("finished moving drop %s to %s", drop["id"], stored)
        return finished


def _write_error(failed: Path, name: str, drop_id: str, reason: str, at: str) -> None:
    note = failed.with_name(failed.name + ".error.txt")
    failed.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(note, error_text(name, drop_id, reason, at))


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    fsync_dir(target.parent)
    fsync_dir(source.parent)
