"""Connections to the SQLite database: WAL, busy timeout, and who takes the write lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

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


class StoreError(Exception):
    """The database cannot be used as asked; the message says why."""


class ConcurrencyError(StoreError):
    """An append expected a stream version that another writer already took."""


def configure(connection: Any) -> None:
    """Driver-level autocommit plus the pragmas every connection needs.

    We issue BEGIN ourselves: pysqlite's implicit BEGIN is deferred, and a deferred
    transaction that later writes can fail with "database is locked" instead of waiting
    for the busy timeout. Writers say BEGIN IMMEDIATE, which waits.
    """
    connection.isolation_level = None
    cursor = connection.cursor()
    for pragma in PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def connect(path: Path) -> sqlite3.Connection:
    """A configured connection that may be used from any one thread at a time."""
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        configure(connection)
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise StoreError(f"{path} is not a usable dropkiln database: {exc}") from exc
    return connection


def sync_engine(path: Path) -> Engine:
    """The engine behind reads and schema changes; connections are used in worker threads.

    A transaction is BEGIN (one consistent snapshot) unless the connection has the
    execution option ``write=True``, then BEGIN IMMEDIATE.
    """
    engine = create_engine(
        f"sqlite:///{path}",
        creator=lambda: connect(path),
        poolclass=QueuePool,
        pool_size=READ_CONNECTIONS,
        max_overflow=READ_CONNECTIONS,
    )

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        write = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def async_engine(path: Path, *, writer: bool) -> AsyncEngine:
    """An aiosqlite engine for callers with their own SQLAlchemy asyncio code."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    event.listen(engine.sync_engine, "connect", lambda conn, _record: configure(conn))
    begin_sql = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin_sql)

    return engine
