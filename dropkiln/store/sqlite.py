"""The SQLite backend: every statement and setting only SQLite understands lives here.

The rest of the store writes standard SQL with ``:name`` parameters (the stdlib driver runs
it as it is; a backend on SQLAlchemy runs the same text through ``text()``) and reaches the
database only through a ``Database``: ``read`` (one consistent snapshot), ``write`` (one
write transaction, durable when asked), ``watch`` (wake on a commit from any process) and
``close``. A second backend (PostgreSQL) implements those and the few helpers at the end.

Plain ``sqlite3``, not SQLAlchemy: readers (``dropkiln status`` must answer in a quarter of a
second) never import SQLAlchemy; it only generates the DDL, when a database is created or
migrated (``migrate``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dropkiln.store.errors import StoreError
from dropkiln.store.pool import ConnectionPool

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect

    from dropkiln.store.commitwatch import CommitWatch

T = TypeVar("T")

BUSY_TIMEOUT_MS = 30_000
READ_CONNECTIONS = 4

# Per connection. cache_size is in KiB when negative; temp_store keeps sorts off the disk;
# journal_size_limit truncates a WAL that a long reader let grow once it is checkpointed.
PRAGMAS = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA cache_size = -16000",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA journal_size_limit = 67108864",
)
# In WAL mode FULL fsyncs the WAL at every commit; it applies from the next BEGIN.
SYNCHRONOUS_FULL = "PRAGMA synchronous = FULL"
SYNCHRONOUS_NORMAL = "PRAGMA synchronous = NORMAL"
# Writers take the write lock up front: a deferred transaction that later writes can fail
# with "database is locked" instead of waiting for the busy timeout. BEGIN IMMEDIATE waits.
BEGIN_WRITE = "BEGIN IMMEDIATE"
BEGIN_READ = "BEGIN"

Connection = sqlite3.Connection
"""What the work given to ``read`` and ``write`` receives. Read connections return rows
that are read by column name, with JSON columns decoded; the write connection returns
plain tuples."""
Error = sqlite3.Error
"""Any failure of the driver; ``EventStore`` turns those into StoreError."""
IntegrityError = sqlite3.IntegrityError
DatabaseError = sqlite3.DatabaseError

# Columns declared JSON (schema.py) come back decoded on read connections. NULL never
# reaches a converter.
sqlite3.register_converter("JSON", json.loads)


def connect(path: Path, *, rows: bool = False) -> sqlite3.Connection:
    """A configured connection that may be used from any one thread at a time; with
    ``rows``, rows by column name and JSON columns decoded (what readers get)."""
    connection = sqlite3.connect(
        path,
        check_same_thread=False,
        # We say BEGIN ourselves (pysqlite's implicit one is deferred; see BEGIN_WRITE).
        isolation_level=None,
        detect_types=sqlite3.PARSE_DECLTYPES if rows else 0,
    )
    if rows:
        connection.row_factory = sqlite3.Row
    try:
        for pragma in PRAGMAS:
            connection.execute(pragma)
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise StoreError(f"{path} is not a usable dropkiln database: {exc}") from exc
    return connection


class Database:
    """One SQLite file: a few read connections, one write connection, used from threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool: ConnectionPool[sqlite3.Connection] = ConnectionPool(
            str(self.path), lambda: connect(self.path, rows=True), READ_CONNECTIONS
        )
        # Made on the first write, so readers (`status`, the dashboard) never hold one.
        self._write_connection: sqlite3.Connection | None = None

    def read(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one read snapshot (BEGIN ... COMMIT), blocking."""
        self._pool.enter()
        try:
            conn = self._pool.borrow()
        except BaseException:
            self._pool.leave()
            raise
        try:
            conn.execute(BEGIN_READ)
            try:
                return work(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        finally:
            self._pool.give_back(conn)
            self._pool.leave()

    def write(self, work: Callable[[Connection], T], *, durable: bool = False) -> T:
        """Run ``work`` in one write transaction (rolled back if it raises), blocking; callers
        serialise writes. With ``durable`` the commit survives a power cut once this returns;
        otherwise a power cut may roll back the last commits, never corrupt the database."""
        self._pool.enter()
        try:
            return self._write(work, durable)
        finally:
            self._pool.leave()

    def _write(self, work: Callable[[Connection], T], durable: bool) -> T:
        if self._write_connection is None:
            self._write_connection = connect(self.path)
        conn = self._write_connection
        if durable:
            conn.execute(SYNCHRONOUS_FULL)
        try:
            conn.execute(BEGIN_WRITE)
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

    def append(self, pending: Any, expected: dict[str, int | None], conn: Connection) -> Any:
        """The events appended in the write transaction on ``conn``, projected."""
        from dropkiln.store.eventstore import _append

        return _append(pending, expected, conn)

    def lock_schema(self, conn: Connection) -> None:
        """Nothing to do: the write transaction (BEGIN IMMEDIATE) already excludes others."""

    def raw_snapshot(self) -> sqlite3.Connection:
        """A new write-style connection (tuples, JSON as text) inside one read snapshot."""
        conn = connect(self.path)
        conn.execute(BEGIN_READ)
        return conn

    def follow_copied_seqs(self, conn: Connection) -> None:
        """Nothing to do: SQLite's autoincrement continues after the highest seq."""

    def use_wal(self) -> None:
        """Switch the file to write-ahead logging (persistent; refused inside a transaction)."""
        self._pool.enter()
        try:
            conn = self._pool.borrow()
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            finally:
                self._pool.give_back(conn)
        finally:
            self._pool.leave()

    @asynccontextmanager
    async def watch(self, poll_interval: float) -> AsyncIterator[CommitWatch]:
        """A ``CommitWatch`` for tails; see there."""
        import anyio.to_thread

        from dropkiln.store.commitwatch import CommitWatch

        conn = await anyio.to_thread.run_sync(connect, self.path)
        watch = CommitWatch(self.path, conn, poll_interval)
        try:
            yield watch
        finally:
            watch.close()

    def close(self) -> None:
        """Refuse new work, wait for the reads and writes still running (also those whose
        caller was cancelled and went away), then close every connection. Blocking."""
        self._pool.drain()
        if self._write_connection is not None:
            self._write_connection.close()
            self._write_connection = None


# SQL that differs between backends ----------------------------------------------------------


def table_exists(conn: Connection, name: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name", {"name": name}
    ).fetchone()
    return found is not None


def json_number(column: str, *path: str) -> str:
    """An SQL expression: the number at ``path`` inside a JSON column (NULL if absent)."""
    return f"json_extract({column}, '$.{'.'.join(path)}')"


def ddl_dialect() -> Dialect:
    """The SQLAlchemy dialect the schema's DDL is compiled for (creation, migrations)."""
    from sqlalchemy.dialects import sqlite

    return sqlite.dialect()
