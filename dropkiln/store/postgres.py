"""The event store on PostgreSQL: same tables, events, projections and reads as on SQLite.

Selected by ``store_url = "postgresql://…"``; several daemons on several boxes share it.
What differs from SQLite, and why:

- Appends take one transaction-scoped advisory lock, so events get their ``seq`` and
  commit in the same order, as SQLite's single writer gives. Without it a tail reading
  ``seq > after`` could pass a lower seq that commits late and never see it.
- Reads run in REPEATABLE READ: one consistent snapshot per ``snapshot`` call, as a SQLite
  read transaction is.
- Only durable events wait for the WAL flush (``synchronous_commit``), the counterpart of
  SQLite's ``synchronous = FULL`` for them and NORMAL for the rest.
- The tail sleeps on LISTEN/NOTIFY (every append notifies in its transaction, so the
  notification arrives at commit), and polls every ``poll_interval`` anyway, in case a
  notification cannot arrive (a pooler in transaction mode, a dropped connection).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import psycopg
from psycopg.types.string import TextLoader
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from dropkiln.store.engine import READ_CONNECTIONS, ConcurrencyError, StoreError
from dropkiln.store.events import utc_now
from dropkiln.store.eventstore import TAIL_BATCH, Batch, EventStore, _tail_batch
from dropkiln.store.migrate import ensure_schema
from dropkiln.store.projections import StoredEvent, apply, changes_for
from dropkiln.store.rawsql import SqlConnection, SqlCursor

T = TypeVar("T")

CHANNEL = "dropkiln_events"
# pg_advisory_xact_lock keys: one for appends (the log's order), one for schema changes.
APPEND_LOCK = 0x64_6B_01
SCHEMA_LOCK = 0x64_6B_02

_STREAM_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE stream = %s"
_LOCK_AND_VERSION = (
    f"SELECT pg_advisory_xact_lock({APPEND_LOCK}), "
    "(SELECT coalesce(max(version), 0) FROM events WHERE stream = %s)"
)
_INSERT_EVENT = (
    "INSERT INTO events (stream, version, type, data, at) VALUES (%s, %s, %s, %s, %s) RETURNING seq"
)
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


@functools.cache
def _pyformat(sql: str) -> str:
    """sqlite3's placeholders (``?``, ``:name``) as psycopg's (``%s``, ``%(name)s``)."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    return _NAMED.sub(r"%(\1)s", sql)


class PgConnection:
    """A psycopg connection that takes the store's SQL text as sqlite3 does.

    Autocommit, like sqlite3 with ``isolation_level=None``: the caller says BEGIN. JSON
    columns come back as text, as SQLite returns them, so replay and check decode them the
    same way on both backends."""

    def __init__(self, url: str) -> None:
        try:
            self.raw = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot connect to the PostgreSQL store: {exc}") from exc
        self.notify_at_commit: int | None = None
        """The seq an append wrote last: tails are notified of it when it commits."""
        for json_type in ("json", "jsonb"):
            self.raw.adapters.register_loader(json_type, TextLoader)

    def execute(self, sql: str, parameters: Any = (), /) -> SqlCursor:
        return self.raw.execute(_pyformat(sql), parameters or None)

    def close(self) -> None:
        self.raw.close()

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken


def _engine(url: str) -> Engine:
    """Reads and schema changes. A connection with ``write=True`` holds the schema lock."""
    engine = create_engine(
        make_url(url).set(drivername="postgresql+psycopg"),
        isolation_level="REPEATABLE READ",
        pool_size=READ_CONNECTIONS,
        max_overflow=READ_CONNECTIONS,
        pool_pre_ping=True,
    )

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        if conn.get_execution_options().get("write", False):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")

    return engine


class PostgresEventStore(EventStore):
    """The event store in a PostgreSQL database; outputs stay under ``root`` (shared)."""

    def __init__(self, url: str, root: Path, engine: Engine) -> None:
        super().__init__(root / "state" / "dropkiln.db", engine)
        self.url = url
        self._root = root
        self._pg_write: PgConnection | None = None

    @property
    def root(self) -> Path:
        return self._root

    @classmethod
    async def open_url(cls, url: str, root: Path, *, create: bool = False) -> PostgresEventStore:
        """Open (with ``create``, set up) the dropkiln schema in the database at ``url``."""
        engine = _engine(url)
        try:
            await anyio.to_thread.run_sync(
                functools.partial(ensure_schema, engine, Path(_redacted(url)), create=create)
            )
        except BaseException:
            engine.dispose()
            raise
        return cls(url, Path(root), engine)

    async def close(self) -> None:
        async with self._write_lock:
            if self._pg_write is not None:
                self._pg_write.close()
                self._pg_write = None
        await super().close()

    @functools.cached_property
    def reader(self) -> AsyncEngine:
        return create_async_engine(
            make_url(self.url).set(drivername="postgresql+psycopg_async"),
            isolation_level="REPEATABLE READ",
        )

    def read_connection(self) -> PgConnection:
        conn = PgConnection(self.url)
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return conn

    def follow_copied_seqs(self, conn: SqlConnection) -> None:
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('events', 'seq'), "
            "(SELECT coalesce(max(seq), 0) + 1 FROM events), false)"
        )

    # Writing ----------------------------------------------------------------------------

    async def transaction(self, work: Callable[[Any], T], *, durable: bool = False) -> T:
        run = functools.partial(self._run_pg_write, work, durable)
        return await anyio.to_thread.run_sync(run, limiter=self._write_lock)

    def _run_pg_write(self, work: Callable[[PgConnection], T], durable: bool) -> T:
        begin = f"BEGIN; SET LOCAL synchronous_commit = {'on' if durable else 'off'}"
        conn = self._pg_write
        if conn is not None:
            try:
                # One round trip to begin: on a busy server each costs more than the SQL.
                conn.raw.execute(begin)
            except psycopg.OperationalError:
                # Nothing was written yet, so a connection the server dropped (a restart,
                # an idle timeout) is replaced and the transaction begun again, once.
                conn.close()
                conn = None
        if conn is None:
            self._pg_write = conn = PgConnection(self.url)
            conn.raw.execute(begin)
        try:
            conn.notify_at_commit = None
            result = work(conn)
            # NOTIFY is delivered at COMMIT; sent together, they cost one round trip.
            notify = conn.notify_at_commit
            conn.raw.execute(f"NOTIFY {CHANNEL}, '{int(notify)}'; COMMIT" if notify else "COMMIT")
        except BaseException:
            if not conn.broken and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def append_batch(
        self, batch: Batch, expected: dict[str, int | None] | None = None
    ) -> list[StoredEvent]:
        pending = [
            (stream, [(event.type_name(), event.model_dump(mode="json")) for event in new])
            for stream, new in batch
        ]
        work = functools.partial(_append, pending, expected or {})
        durable = any(event.durable for _, new in batch for event in new)
        return await self.transaction(work, durable=durable)

    # Reading ----------------------------------------------------------------------------

    async def tail(
        self,
        after: int = 0,
        *,
        poll_interval: float = 1.0,
        stream: str | None = None,
        types: Sequence[str] | None = None,
    ) -> AsyncGenerator[StoredEvent, None]:
        """Every event after ``after``, forever: woken by NOTIFY, else every poll_interval."""
        listener = await _listen(self.url)
        try:
            while True:
                batch, scanned_to = await self.snapshot(
                    functools.partial(_tail_batch, after, stream, types)
                )
                for stored in batch:
                    yield stored
                if len(batch) == TAIL_BATCH:
                    after = batch[-1].seq
                    continue
                after = max(after, scanned_to)
                listener = await _wait(self.url, listener, poll_interval)
        finally:
            if listener is not None:
                await listener.close()


async def _listen(url: str) -> psycopg.AsyncConnection[Any] | None:
    """A connection listening on the channel, or None: the tail then only polls."""
    try:
        listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await listener.execute(f"LISTEN {CHANNEL}")
    except psycopg.Error:
        return None
    return listener


async def _wait(
    url: str, listener: psycopg.AsyncConnection[Any] | None, poll_interval: float
) -> psycopg.AsyncConnection[Any] | None:
    """Until a commit is notified or poll_interval passes. A listener that broke is dropped;
    without one it polls and tries to listen again (the server restarted, say)."""
    if listener is None:
        await anyio.sleep(poll_interval)
        return await _listen(url)  # before the next read, so no commit goes unnoticed
    try:
        async for _ in listener.notifies(timeout=poll_interval, stop_after=1):
            pass
    except psycopg.Error:
        await listener.close()
        return None
    return listener


def _append(
    pending: list[tuple[str, list[tuple[str, dict[str, Any]]]]],
    expected: dict[str, int | None],
    conn: PgConnection,
) -> list[StoredEvent]:
    raw = conn.raw
    stored: list[StoredEvent] = []
    at = ""
    for index, (stream, new) in enumerate(pending):
        if index == 0:  # the lock and the first stream's version in one round trip
            row = raw.execute(_LOCK_AND_VERSION, (stream,)).fetchone()
            at = utc_now()  # under the lock, so ``at`` follows ``seq``
        else:
            row = raw.execute(_STREAM_VERSION, (stream,)).fetchone()
        current = int(row[-1]) if row else 0
        want = expected.get(stream)
        if want is not None and want != current:
            raise ConcurrencyError(
                f"stream {stream} is at version {current}, expected {want}: "
                "another writer appended first; nothing was written"
            )
        for type_name, data in new:
            current += 1
            try:
                inserted = raw.execute(
                    _INSERT_EVENT, (stream, current, type_name, json.dumps(data), at)
                ).fetchone()
            except psycopg.errors.UniqueViolation as exc:
                raise ConcurrencyError(
                    f"stream {stream} already has version {current}: "
                    "another writer appended first; nothing was written"
                ) from exc
            seq = int(inserted[0]) if inserted else 0
            event = StoredEvent(seq, stream, current, type_name, data, at)
            try:
                apply(conn, changes_for(event))
            except psycopg.IntegrityError as exc:
                raise StoreError(
                    f"{type_name} on {stream} contradicts the projections ({exc}); "
                    "nothing was written"
                ) from exc
            stored.append(event)
    if stored:
        conn.notify_at_commit = stored[-1].seq
    return stored


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)
