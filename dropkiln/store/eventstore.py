"""The event store: append with optimistic concurrency, read, and tail across processes.

SQLite calls block, so they run in worker threads and the event loop only awaits them:
one thread hop per write transaction (the whole append, projections included) and one
per read snapshot. Writes are serialised on one connection that says BEGIN IMMEDIATE,
so they queue on SQLite's lock (busy timeout) instead of failing with "database is locked".
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import watchfiles
from sqlalchemy import Connection, Engine, Select, func, literal, select
from sqlalchemy.ext.asyncio import AsyncEngine

from dropkiln.store.engine import (
    READ_CONNECTIONS,
    ConcurrencyError,
    StoreError,
    async_engine,
    connect,
    sync_engine,
)
from dropkiln.store.events import Event, utc_now
from dropkiln.store.migrate import ensure_schema
from dropkiln.store.projections import StoredEvent, apply, changes_for
from dropkiln.store.schema import HIGH_RATE_TYPE, events

T = TypeVar("T")
Batch = Sequence[tuple[str, Sequence[Event]]]
TAIL_BATCH = 500

SYNCHRONOUS_FULL = "PRAGMA synchronous = FULL"
SYNCHRONOUS_NORMAL = "PRAGMA synchronous = NORMAL"
_STREAM_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE stream = ?"
_INSERT_EVENT = "INSERT INTO events (stream, version, type, data, at) VALUES (?, ?, ?, ?, ?)"


class EventStore:
    """One SQLite database under ``state/``; safe to open from several processes."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self.engine = engine
        # Made on the first write, so readers (`status`, the TUI) never hold one.
        self._write_connection: sqlite3.Connection | None = None
        self._write_lock = anyio.CapacityLimiter(1)
        self._read_limiter = anyio.CapacityLimiter(READ_CONNECTIONS)

    @classmethod
    async def open(cls, path: Path, *, create: bool = False) -> EventStore:
        """Open (or with ``create``, make) the database at ``path``."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise StoreError(
                    f"no dropkiln database at {path}: run 'dropkiln init' or start the daemon"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sync_engine(path)
        try:
            await anyio.to_thread.run_sync(
                functools.partial(ensure_schema, engine, path, create=create)
            )
            return cls(path, engine)
        except BaseException:
            engine.dispose()
            raise

    async def close(self) -> None:
        async with self._write_lock:
            if self._write_connection is not None:
                self._write_connection.close()
                self._write_connection = None
        self.engine.dispose()
        for name in ("reader", "writer"):
            if name in self.__dict__:
                await self.__dict__[name].dispose()

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @functools.cached_property
    def reader(self) -> AsyncEngine:
        """An aiosqlite engine for callers with their own SQLAlchemy asyncio queries."""
        return async_engine(self.path, writer=False)

    @functools.cached_property
    def writer(self) -> AsyncEngine:
        """Like ``reader``, but its transactions take the write lock (BEGIN IMMEDIATE)."""
        return async_engine(self.path, writer=True)

    # Transactions -----------------------------------------------------------------------

    async def transaction(
        self, work: Callable[[sqlite3.Connection], T], *, durable: bool = False
    ) -> T:
        """Run ``work`` in one write transaction in a worker thread; rolled back if it raises.

        With ``durable`` the commit survives a power cut once this returns. Otherwise (the
        default, synchronous=NORMAL) a power cut may roll back the last commits, never
        corrupt the database; the next durable commit makes them durable too."""
        run = functools.partial(self._run_write, work, durable)
        return await anyio.to_thread.run_sync(run, limiter=self._write_lock)

    def _run_write(self, work: Callable[[sqlite3.Connection], T], durable: bool) -> T:
        if self._write_connection is None:
            self._write_connection = connect(self.path)
        conn = self._write_connection
        if durable:
            # In WAL mode FULL fsyncs the WAL at commit; it applies from the next BEGIN.
            conn.execute(SYNCHRONOUS_FULL)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if durable:
                conn.execute(SYNCHRONOUS_NORMAL)
        return result

    async def snapshot(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` on a read connection, in one consistent snapshot, in a worker thread."""

        def run() -> T:
            with self.engine.connect() as conn:
                return work(conn)

        return await anyio.to_thread.run_sync(run, limiter=self._read_limiter)

    # Writing ----------------------------------------------------------------------------

    async def append(
        self, stream: str, new: Sequence[Event], expected_version: int | None = None
    ) -> list[StoredEvent]:
        """Append events to one stream; ``expected_version`` is the version last seen."""
        return await self.append_batch([(stream, new)], {stream: expected_version})

    async def append_batch(
        self, batch: Batch, expected: dict[str, int | None] | None = None
    ) -> list[StoredEvent]:
        """Append to several streams in one transaction (all or nothing)."""
        pending = [
            (stream, [(event.type_name(), event.model_dump(mode="json")) for event in new])
            for stream, new in batch
        ]
        work = functools.partial(_append, pending, expected or {})
        durable = any(event.durable for _, new in batch for event in new)
        stored = await self.transaction(work, durable=durable)
        return stored

    # Reading ----------------------------------------------------------------------------

    async def read(
        self,
        after: int = 0,
        *,
        limit: int | None = 1000,
        stream: str | None = None,
        types: Sequence[str] | None = None,
    ) -> list[StoredEvent]:
        """Events with ``seq > after`` in order, optionally of one stream or some types."""
        query = events_after(after, stream, types, limit)
        return await self.snapshot(lambda conn: _stored(conn.execute(query)))

    async def last(
        self, stream: str | None = None, types: Sequence[str] | None = None, limit: int = 1
    ) -> list[StoredEvent]:
        """The newest events (newest first), optionally of one stream or some types."""
        query = newest_events(stream, types, limit)
        return await self.snapshot(lambda conn: _stored(conn.execute(query)))

    async def last_seq(self) -> int:
        query = select(func.coalesce(func.max(events.c.seq), 0))
        return await self.snapshot(lambda conn: int(conn.execute(query).scalar_one()))

    async def stream_version(self, stream: str) -> int:
        query = select(func.coalesce(func.max(events.c.version), 0)).where(
            events.c.stream == stream
        )
        return await self.snapshot(lambda conn: int(conn.execute(query).scalar_one()))

    async def tail(
        self,
        after: int = 0,
        *,
        poll_interval: float = 1.0,
        stream: str | None = None,
        types: Sequence[str] | None = None,
    ) -> AsyncGenerator[StoredEvent, None]:
        """Every event after ``after``, forever.

        It sleeps until the database's files change: every commit, from this process or
        another, writes the WAL file, and the kernel says so (inotify, through watchfiles).
        ``PRAGMA data_version`` then tells a real commit from a checkpoint. Where change
        notifications do not reach (some network filesystems) it looks every
        ``poll_interval`` seconds anyway."""
        watch = await anyio.to_thread.run_sync(connect, self.path)
        changes = watchfiles.awatch(
            self.path.parent,
            watch_filter=lambda _, changed: Path(changed).name.startswith(self.path.name),
            recursive=False,
            debounce=50,
            # Each step takes the GIL: 15 ms (a commit seen within two steps) instead of
            # 2 ms cuts an idle daemon's CPU by over 1% of a core (issue 16).
            step=15,
            rust_timeout=max(1, round(poll_interval * 1000)),
            yield_on_timeout=True,
        )
        try:
            while True:
                # Read before the batch: a commit the batch misses changes it afterwards.
                version = await anyio.to_thread.run_sync(_data_version, watch)
                batch, scanned_to = await self.snapshot(
                    functools.partial(_tail_batch, after, stream, types)
                )
                for stored in batch:
                    yield stored
                if len(batch) == TAIL_BATCH:
                    after = batch[-1].seq
                    continue
                # Nothing else matched up to scanned_to in this snapshot, and seqs are
                # assigned in commit order, so filtered tails need not scan it again.
                after = max(after, scanned_to)
                async for _ in changes:
                    if await anyio.to_thread.run_sync(_data_version, watch) != version:
                        break
        finally:
            await changes.aclose()
            watch.close()


def _append(
    pending: list[tuple[str, list[tuple[str, dict[str, Any]]]]],
    expected: dict[str, int | None],
    conn: sqlite3.Connection,
) -> list[StoredEvent]:
    at = utc_now()  # under the write lock, so ``at`` follows ``seq`` on one machine
    stored: list[StoredEvent] = []
    for stream, new in pending:
        current: int = conn.execute(_STREAM_VERSION, (stream,)).fetchone()[0]
        want = expected.get(stream)
        if want is not None and want != current:
            raise ConcurrencyError(
                f"stream {stream} is at version {current}, expected {want}: "
                "another writer appended first; nothing was written"
            )
        for type_name, data in new:
            current += 1
            try:
                cursor = conn.execute(
                    _INSERT_EVENT, (stream, current, type_name, json.dumps(data), at)
                )
            except sqlite3.IntegrityError as exc:
                raise ConcurrencyError(
                    f"stream {stream} already has version {current}: "
                    "another writer appended first; nothing was written"
                ) from exc
            event = StoredEvent(cursor.lastrowid or 0, stream, current, type_name, data, at)
            try:
                apply(conn, changes_for(event))
            except sqlite3.IntegrityError as exc:
                raise StoreError(
                    f"{type_name} on {stream} contradicts the projections ({exc}); "
                    "nothing was written"
                ) from exc
            stored.append(event)
    return stored


def events_after(
    after: int, stream: str | None, types: Sequence[str] | None, limit: int | None
) -> Select[Any]:
    """Events with ``seq > after``, oldest first."""
    query = select(events).where(events.c.seq > after).order_by(events.c.seq)
    if stream is not None:
        query = query.where(events.c.stream == stream)
    query = _of_types(query, types, indexed=stream is None)
    return query if limit is None else query.limit(limit)


def newest_events(stream: str | None, types: Sequence[str] | None, limit: int) -> Select[Any]:
    """The newest events, newest first."""
    if stream is not None:
        # Within a stream, version order is seq order, and walking the (stream, version)
        # index backwards stops at the first match instead of scanning the log.
        query = select(events).where(events.c.stream == stream).order_by(events.c.version.desc())
    else:
        query = select(events).order_by(events.c.seq.desc())
    return _of_types(query, types, indexed=stream is None).limit(limit)


def _of_types(query: Select[Any], types: Sequence[str] | None, *, indexed: bool) -> Select[Any]:
    if not types:
        return query
    query = query.where(events.c.type.in_(list(types)))
    if indexed and HIGH_RATE_TYPE not in types:
        # Repeats the partial index's condition, inline, so SQLite knows it may use it.
        high_rate = literal(HIGH_RATE_TYPE, literal_execute=True)
        query = query.where(events.c.type != high_rate)
    return query


def _tail_batch(
    after: int, stream: str | None, types: Sequence[str] | None, conn: Connection
) -> tuple[list[StoredEvent], int]:
    batch = _stored(conn.execute(events_after(after, stream, types, TAIL_BATCH)))
    scanned_to = conn.execute(select(func.coalesce(func.max(events.c.seq), 0))).scalar_one()
    return batch, int(scanned_to)


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _stored(rows: Any) -> list[StoredEvent]:
    return [row_event(row) for row in rows]


def row_event(row: Any) -> StoredEvent:
    """The StoredEvent for a row of the events table."""
    return StoredEvent(row.seq, row.stream, row.version, row.type, row.data, row.at)
