"""The PostgreSQL backend: a ``Database`` like ``sqlite.Database``, for ``store_url``.

Several daemons on several boxes can share it. What differs from SQLite, and why:

- Appends take one transaction-scoped advisory lock, so events get their ``seq`` and
  commit in the same order, as SQLite's single writer gives. Without it a tail reading
  ``seq > after`` could pass a lower seq that commits late and never see it.
- Reads run in REPEATABLE READ: one consistent snapshot per ``read``, as a SQLite read
  transaction is.
- Only durable commits wait for the WAL flush (``synchronous_commit``), the counterpart of
  SQLite's ``synchronous = FULL`` for them and NORMAL for the rest.
- Tails sleep on LISTEN/NOTIFY (an append notifies with its COMMIT), and poll every
  ``poll_interval`` anyway, in case a notification cannot arrive (a pooler in transaction
  mode, a dropped connection); a listener that broke is replaced.
- The store's SQL is sqlite3's (``?`` and ``:name`` placeholders); ``PgConnection`` runs it
  through psycopg 3 with its own placeholders.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg.rows import RowMaker
from psycopg.types.string import TextLoader

from dropkiln.store.errors import ConcurrencyError, StoreError
from dropkiln.store.pg_notify import CHANNEL, NotifyWatch
from dropkiln.store.pool import ConnectionPool
from dropkiln.store.stored import StoredEvent

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect

T = TypeVar("T")

READ_CONNECTIONS = 4
# pg_advisory_xact_lock keys: one for appends (the log's order), one for schema changes.
APPEND_LOCK = 0x64_6B_01
SCHEMA_LOCK = 0x64_6B_02
BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# A writer stopped inside its transaction (SIGSTOP, a frozen VM, a lost box) holds the append
# lock, and every other daemon's writes wait behind it, lease expiry included: the server
# ends a session idle in a write transaction this long, which rolls it back and frees the lock.
STALLED_WRITER_S = 10

_STREAM_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE stream = %s"
# Its own statement: in READ COMMITTED a statement reads the snapshot taken when it began, so
# a version read in the statement that waited for the lock misses the append the lock's
# previous holder committed meanwhile, and the insert then collides with it.
_LOCK_APPENDS = f"SELECT pg_advisory_xact_lock({APPEND_LOCK})"
_INSERT_EVENT = (
    "INSERT INTO events (stream, version, type, data, at) VALUES (%s, %s, %s, %s, %s) RETURNING seq"
)
_NAMED = re.compile(r"(?<![:\w]):(\w+)")

Error = psycopg.Error
IntegrityError = psycopg.IntegrityError
DatabaseError = psycopg.DatabaseError


@functools.cache
def _pyformat(sql: str) -> str:
    """sqlite3's placeholders (``?``, ``:name``) as psycopg's (``%s``, ``%(name)s``)."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    return _NAMED.sub(r"%(\1)s", sql)


class Row(tuple[Any, ...]):
    """A row read by position or by column name, as sqlite3.Row (and ``dict(row)``)."""

    _names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(self._names.index(key))
        return super().__getitem__(key)

    def keys(self) -> tuple[str, ...]:
        return self._names


def _named_rows(cursor: Any) -> RowMaker[Row]:
    names = tuple(column.name for column in cursor.description or ())
    kind = type("Row", (Row,), {"_names": names})
    return lambda values: kind(values)


class _SessionEnded(Exception):
    """The write connection broke inside a transaction, before its commit was sent."""


class PgConnection:
    """A psycopg connection that takes the store's SQL text as sqlite3 does.

    Autocommit, like sqlite3 with ``isolation_level=None``: the caller says BEGIN. With
    ``rows`` (readers), rows by column name and JSON decoded; otherwise (the writer, long
    scans) tuples with JSON as text, as SQLite returns them."""

    backend = "postgresql"

    def __init__(self, url: str, *, rows: bool = False) -> None:
        try:
            self.raw = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot connect to the PostgreSQL store: {exc}") from exc
        if rows:
            self.raw.row_factory = _named_rows
        else:
            for json_type in ("json", "jsonb"):
                self.raw.adapters.register_loader(json_type, TextLoader)
        self.notify_at_commit: int | None = None
        """The seq an append wrote last: tails are notified of it when it commits."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self.raw.execute(_pyformat(sql), parameters or None)

    def close(self) -> None:
        self.raw.close()

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken


class PostgresDatabase:
    """One PostgreSQL database: a few read connections, one write connection, from threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = redacted(url)
        self._pool: ConnectionPool[PgConnection] = ConnectionPool(
            str(self.path),
            lambda: PgConnection(self.url, rows=True),
            READ_CONNECTIONS,
            lambda conn: not conn.broken,
        )
        self._write: PgConnection | None = None

    def read(self, work: Callable[[PgConnection], T]) -> T:
        """Run ``work`` in one read snapshot (REPEATABLE READ), blocking."""
        self._pool.enter()
        try:
            return self._read(work)
        finally:
            self._pool.leave()

    def _read(self, work: Callable[[PgConnection], T]) -> T:
        conn = self._pool.borrow()
        try:
            conn.execute(BEGIN_READ)
        except psycopg.OperationalError:
            # An idle connection the server dropped: nothing was read yet, take a new one.
            conn.close()
            conn = PgConnection(self.url, rows=True)
            conn.execute(BEGIN_READ)
        try:
            try:
                return work(conn)
            finally:
                if not conn.broken and conn.in_transaction:
                    conn.execute("COMMIT")
        finally:
            self._pool.give_back(conn)

    def write(self, work: Callable[[PgConnection], T], *, durable: bool = False) -> T:
        """Run ``work`` in one write transaction (rolled back if it raises), blocking."""
        self._pool.enter()
        try:
            try:
                return self._write_transaction(work, durable)
            except _SessionEnded:
                # The server ended the session before the commit was asked for (idle in the
                # transaction too long: this process was stopped; a server restart). Nothing
                # was written, so the work runs once more on a new connection; it reads
                # again what it decides on (versions, leases).
                return self._write_transaction(work, durable)
            except psycopg.Error as exc:
                raise StoreError(f"writing {self.path} failed: {exc}") from exc
        finally:
            self._pool.leave()

    def _write_transaction(self, work: Callable[[PgConnection], T], durable: bool) -> T:
        begin = (
            f"BEGIN; SET LOCAL synchronous_commit = {'on' if durable else 'off'}; "
            f"SET LOCAL idle_in_transaction_session_timeout = '{STALLED_WRITER_S}s'"
        )
        conn = self._write
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
            self._write = conn = PgConnection(self.url)
            conn.raw.execute(begin)
        try:
            conn.notify_at_commit = None
            try:
                result = work(conn)
            except (
                psycopg.OperationalError,
                psycopg.errors.IdleInTransactionSessionTimeout,
            ) as exc:
                if not conn.broken:
                    raise
                conn.close()
                self._write = None
                raise _SessionEnded(str(exc)) from exc
            # NOTIFY is delivered at COMMIT; sent together, they cost one round trip.
            notify = conn.notify_at_commit
            try:
                commit = f"NOTIFY {CHANNEL}, '{int(notify)}'; COMMIT" if notify else "COMMIT"
                conn.raw.execute(commit)
            except psycopg.errors.IdleInTransactionSessionTimeout as exc:
                # Ended before the commit arrived (unlike a connection lost during the
                # commit, whose outcome is unknown and is not made again).
                conn.close()
                self._write = None
                raise _SessionEnded(str(exc)) from exc
        except BaseException:
            if not conn.broken and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def append(
        self,
        pending: list[tuple[str, list[tuple[str, dict[str, Any]]]]],
        expected: dict[str, int | None],
        conn: PgConnection,
    ) -> list[StoredEvent]:
        """The events appended in the write transaction on ``conn``, projected."""
        return _append(pending, expected, conn)

    def raw_snapshot(self) -> PgConnection:
        conn = PgConnection(self.url)
        conn.execute(BEGIN_READ)
        return conn

    def follow_copied_seqs(self, conn: PgConnection) -> None:
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('events', 'seq'), "
            "(SELECT coalesce(max(seq), 0) + 1 FROM events), false)"
        )

    def lock_schema(self, conn: PgConnection) -> None:
        """Schema changes from several boxes at once wait for each other."""
        conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")

    def use_wal(self) -> None:
        """Nothing to do: PostgreSQL always logs ahead."""

    @asynccontextmanager
    async def watch(self, poll_interval: float) -> AsyncIterator[NotifyWatch]:
        watch = NotifyWatch(self.url, poll_interval)
        try:
            await watch.listen()
            yield watch
        finally:
            await watch.close()

    def close(self) -> None:
        """Refuse new work, wait for the reads and writes still running (also those whose
        caller was cancelled and went away), then close every connection. Blocking."""
        self._pool.drain()
        if self._write is not None:
            self._write.close()
            self._write = None


def _append(
    pending: list[tuple[str, list[tuple[str, dict[str, Any]]]]],
    expected: dict[str, int | None],
    conn: PgConnection,
) -> list[StoredEvent]:
    # Imported here, as on SQLite: only writers need the projections.
    from dropkiln.store.eventstore import utc_now
    from dropkiln.store.rows import apply, changes_for

    raw = conn.raw
    stored: list[StoredEvent] = []
    at = ""
    for index, (stream, new) in enumerate(pending):
        if index == 0:
            raw.execute(_LOCK_APPENDS)
            at = utc_now()  # under the lock, so ``at`` follows ``seq``
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


# SQL that differs between backends ----------------------------------------------------------


def table_exists(conn: PgConnection, name: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM pg_catalog.pg_tables WHERE tablename = :name "
        "AND schemaname = current_schema()",
        {"name": name},
    ).fetchone()
    return found is not None


def json_number(column: str, *path: str) -> str:
    """An SQL expression: the number at ``path`` inside a JSON column (NULL if absent)."""
    keys = ", ".join(f"'{key}'" for key in path)
    return f"(json_extract_path_text({column}, {keys}))::float8"


def ddl_dialect() -> Dialect:
    from sqlalchemy.dialects import postgresql

    dialect: Dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    return dialect


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


__all__ = ["PgConnection", "PostgresDatabase", "Sequence"]
