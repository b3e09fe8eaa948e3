"""The event store: append with optimistic concurrency, read, and tail across processes.

The one way into the database. Every write is ``transaction`` and every read is
``snapshot``; the SQL they run is in this module (the log), ``queries`` (the read models)
and ``projections``; what only SQLite understands is in ``sqlite``. Its calls block, so they
run in worker threads and the event loop only awaits them: one thread hop per write
transaction (the whole append, projections included) and one per read snapshot. Writes are
serialised on one connection that says BEGIN IMMEDIATE, so they queue on SQLite's lock (busy
timeout) instead of failing with "database is locked".
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from dropkiln.store import sqlite
from dropkiln.store.errors import ConcurrencyError, StoreError
from dropkiln.store.rawsql import Database, SqlConnection
from dropkiln.store.stored import StoredEvent

T = TypeVar("T")
Batch = Sequence[tuple[str, Sequence[Any]]]
"""(stream, events) pairs; the events are ``dropkiln.store.events.Event`` models."""
TAIL_BATCH = 500
HIGH_RATE_TYPE = "JobProgress"
"""Most of the log, and never looked up by type: the type index leaves it out (schema.py),
so queries by other types repeat that condition to let SQLite use the index."""

_STREAM_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE stream = :stream"
_INSERT_EVENT = (
    "INSERT INTO events (stream, version, type, data, at) "
    "VALUES (:stream, :version, :type, :data, :at)"
)
_LAST_SEQ = "SELECT coalesce(max(seq), 0) AS seq FROM events"
EVENT_COLUMNS = "seq, stream, version, type, data, at"


class EventStore:
    """One database under ``state/``; safe to open from several processes."""

    def __init__(self, path: Path, database: Database, *, inline: bool = False) -> None:
        """``inline``: every read and write runs in the caller's thread, so a one-shot
        command's coroutine never waits and needs no event loop (``run_inline``); the
        daemon's store hands them to worker threads."""
        self.path = path
        self.database = database
        self._inline = inline
        if not inline:
            self._write_lock = anyio.CapacityLimiter(1)
            self._read_limiter = anyio.CapacityLimiter(sqlite.READ_CONNECTIONS)

    async def call(self, work: Callable[[], T], limiter: str | None = None) -> T:
        """``work`` in a worker thread (under the limiter of that name), or here when inline."""
        if self._inline:
            return work()
        chosen = getattr(self, limiter) if limiter else None
        return await anyio.to_thread.run_sync(work, limiter=chosen)

    @classmethod
    async def open(cls, path: Path, *, create: bool = False, inline: bool = False) -> EventStore:
        """Open (or with ``create``, make) the database at ``path``."""
        from dropkiln.store.migrate import ensure_schema

        path = Path(path)
        if not path.exists():
            if not create:
                raise StoreError(
                    f"no dropkiln database at {path}: run 'dropkiln init' or start the daemon"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        database = sqlite.Database(path)
        try:
            store = cls(path, database, inline=inline)
            await store.call(functools.partial(ensure_schema, database, create=create))
            return store
        except BaseException:
            database.close()
            raise

    async def close(self) -> None:
        """Close the database once the reads and writes still running are done, also those
        whose caller was cancelled; anything asked after this fails with StoreError."""
        await self.call(self.database.close)

    @property
    def root(self) -> Path:
        """The dropkiln root whose outputs this store's artifacts name."""
        return self.path.parent.parent  # ROOT/state/dropkiln.db

    def read_connection(self) -> SqlConnection:
        """A new raw connection (rows as tuples, JSON as text) inside one read snapshot,
        for long scans (``store check``, ``store copy``); close it after."""
        return self.database.raw_snapshot()

    def follow_copied_seqs(self, conn: SqlConnection) -> None:
        """After events were inserted with their seq given (``store copy``), make the next
        append take the seq after them."""
        self.database.follow_copied_seqs(conn)

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # Transactions -----------------------------------------------------------------------

    async def transaction(
        self, work: Callable[[sqlite.Connection], T], *, durable: bool = False
    ) -> T:
        """Run ``work`` in one write transaction in a worker thread; rolled back if it raises.

        With ``durable`` the commit survives a power cut once this returns. Otherwise (the
        default, synchronous=NORMAL) a power cut may roll back the last commits, never
        corrupt the database; the next durable commit makes them durable too."""
        run = functools.partial(self.database.write, work, durable=durable)
        try:
            return await self.call(run, "_write_lock")
        except sqlite.Error as exc:
            raise StoreError(f"writing {self.path} failed: {exc}") from exc

    async def snapshot(self, work: Callable[[sqlite.Connection], T]) -> T:
        """Run ``work`` on a read connection, in one consistent snapshot, in a worker thread."""
        run = functools.partial(self.database.read, work)
        try:
            return await self.call(run, "_read_limiter")
        except sqlite.Error as exc:
            raise StoreError(f"reading {self.path} failed: {exc}") from exc

    # Writing ----------------------------------------------------------------------------

    async def append(
        self, stream: str, new: Sequence[Any], expected_version: int | None = None
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
        work = functools.partial(self.database.append, pending, expected or {})
        durable = any(event.durable for _, new in batch for event in new)
        return await self.transaction(work, durable=durable)

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
        sql, params = events_after(after, stream, types, limit)
        return await self.snapshot(lambda conn: stored_events(conn.execute(sql, params)))

    async def last(
        self, stream: str | None = None, types: Sequence[str] | None = None, limit: int = 1
    ) -> list[StoredEvent]:
        """The newest events (newest first), optionally of one stream or some types."""
        sql, params = newest_events(stream, types, limit)
        return await self.snapshot(lambda conn: stored_events(conn.execute(sql, params)))

    async def last_seq(self) -> int:
        return await self.snapshot(lambda conn: int(conn.execute(_LAST_SEQ).fetchone()[0]))

    async def tail(
        self,
        after: int = 0,
        *,
        poll_interval: float = 1.0,
        stream: str | None = None,
        types: Sequence[str] | None = None,
    ) -> AsyncGenerator[StoredEvent, None]:
        """Every event after ``after``, forever; it sleeps until a commit appends events
        (see ``commitwatch.CommitWatch``)."""
        async with self.database.watch(poll_interval) as watch:
            while True:
                # Read before the batch: a commit the batch misses changes it afterwards.
                version = await watch.version()
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
                await watch.changed_since(version)


def _append(
    pending: list[tuple[str, list[tuple[str, dict[str, Any]]]]],
    expected: dict[str, int | None],
    conn: sqlite.Connection,
) -> list[StoredEvent]:
    # Imported here: only writers need the projections.
    from dropkiln.store.rows import apply, changes_for

    at = utc_now()  # under the write lock, so ``at`` follows ``seq`` on one machine
    stored: list[StoredEvent] = []
    for stream, new in pending:
        current: int = conn.execute(_STREAM_VERSION, {"stream": stream}).fetchone()[0]
        want = expected.get(stream)
        if want is not None and want != current:
            raise ConcurrencyError(
                f"stream {stream} is at version {current}, expected {want}: "
                "another writer appended first; nothing was written"
            )
        for type_name, data in new:
            current += 1
            row = {
                "stream": stream,
                "version": current,
                "type": type_name,
                "data": json.dumps(data),
                "at": at,
            }
            try:
                cursor = conn.execute(_INSERT_EVENT, row)
            except sqlite.IntegrityError as exc:
                raise ConcurrencyError(
                    f"stream {stream} already has version {current}: "
                    "another writer appended first; nothing was written"
                ) from exc
            event = StoredEvent(cursor.lastrowid or 0, stream, current, type_name, data, at)
            try:
                apply(conn, changes_for(event))
            except sqlite.IntegrityError as exc:
                raise StoreError(
                    f"{type_name} on {stream} contradicts the projections ({exc}); "
                    "nothing was written"
                ) from exc
            stored.append(event)
    return stored


def utc_now() -> str:
    """The ``at`` of events: UTC, ISO 8601, microseconds (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


Query = tuple[str, dict[str, Any]]
"""SQL text with ``:name`` parameters, and the parameters."""


def events_after(
    after: int, stream: str | None, types: Sequence[str] | None, limit: int | None
) -> Query:
    """Events with ``seq > after``, oldest first."""
    where: list[str] = ["seq > :after"]
    params: dict[str, Any] = {"after": after}
    if stream is not None:
        where.append("stream = :stream")
        params["stream"] = stream
    where += _of_types(types, params, indexed=stream is None)
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = limit
    return sql, params


def newest_events(stream: str | None, types: Sequence[str] | None, limit: int) -> Query:
    """The newest events, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if stream is not None:
        # Within a stream, version order is seq order, and walking the (stream, version)
        # index backwards stops at the first match instead of scanning the log.
        where, order = ["stream = :stream"], "version DESC"
        params["stream"] = stream
    else:
        where, order = [], "seq DESC"
    where += _of_types(types, params, indexed=stream is None)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {EVENT_COLUMNS} FROM events{condition} ORDER BY {order} LIMIT :limit", params


def _of_types(types: Sequence[str] | None, params: dict[str, Any], *, indexed: bool) -> list[str]:
    if not types:
        return []
    names = [f":type{i}" for i in range(len(types))]
    params.update((name[1:], value) for name, value in zip(names, types, strict=True))
    where = [f"type IN ({', '.join(names)})"]
    if indexed and HIGH_RATE_TYPE not in types:
        # The partial index's condition, inline (not a parameter), so SQLite may use it.
        where.append(f"type != '{HIGH_RATE_TYPE}'")
    return where


def _tail_batch(
    after: int, stream: str | None, types: Sequence[str] | None, conn: sqlite.Connection
) -> tuple[list[StoredEvent], int]:
    sql, params = events_after(after, stream, types, TAIL_BATCH)
    batch = stored_events(conn.execute(sql, params))
    scanned_to = conn.execute(_LAST_SEQ).fetchone()[0]
    return batch, int(scanned_to)


def stored_events(rows: Any) -> list[StoredEvent]:
    """StoredEvents for rows of the events table (read connections decode ``data``)."""
    return [StoredEvent(*row) for row in rows]
