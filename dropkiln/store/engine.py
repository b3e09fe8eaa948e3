"""Opening the SQLite database: WAL, busy timeout, write transactions, schema version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dropkiln.store.schema import SCHEMA_VERSION, meta, metadata

BUSY_TIMEOUT_MS = 30_000


class StoreError(Exception):
    """The database cannot be used as asked; the message says why."""


class ConcurrencyError(StoreError):
    """An append expected a stream version that another writer already took."""


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Driver-level autocommit: we issue BEGIN ourselves (see _begin_*), because pysqlite's
    # implicit BEGIN is deferred and a deferred writer can fail with "database is locked"
    # instead of waiting for the busy timeout.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def make_engine(path: Path, *, writer: bool) -> AsyncEngine:
    """An engine whose transactions are BEGIN IMMEDIATE (writer) or plain BEGIN (reader)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    event.listen(engine.sync_engine, "connect", _on_connect)
    begin_sql = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin_sql)

    return engine


async def ensure_schema(conn: AsyncConnection, *, create: bool) -> int:
    """Create or migrate the schema; refuse a database written by a newer dropkiln."""
    has_meta = await conn.run_sync(lambda c: c.dialect.has_table(c, "meta"))
    if not has_meta:
        if not create:
            raise StoreError("the database has no dropkiln schema")
        await conn.run_sync(metadata.create_all)
        await conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
        return SCHEMA_VERSION
    row = await conn.execute(select(meta.c.value).where(meta.c.key == "schema_version"))
    found = int(row.scalar_one())
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the database was written by a newer dropkiln (schema {found}; this version "
            f"reads up to {SCHEMA_VERSION}): upgrade dropkiln, the database is left untouched"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        await MIGRATIONS[version](conn)
        await conn.execute(
            meta.update().where(meta.c.key == "schema_version").values(value=str(version))
        )
    return SCHEMA_VERSION


# Forward migrations: MIGRATIONS[n] takes a schema n-1 database to schema n, in the same
# transaction that records the new version. Schema 1 is the first; nothing to migrate yet.
MIGRATIONS: dict[int, Any] = {}
