"""Schema versions: create a new database, migrate an older one, refuse a newer one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, select
from sqlalchemy.exc import DatabaseError

from dropkiln.store import schema
from dropkiln.store.engine import StoreError


def _lookup_indexes(conn: Connection) -> None:
    """Schema 2: events by type (without JobProgress) and jobs by submission order."""
    for index in (schema.events_by_type, schema.jobs_by_submission):
        index.create(conn, checkfirst=True)


# MIGRATIONS[n] takes a schema n-1 database to schema n, inside the write transaction that
# records n, so a migration that fails leaves the database at n-1. Schema 1 is the first.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _lookup_indexes}


def _stored_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table(schema.meta.name):
        return None
    value = conn.execute(
        select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
    ).scalar()
    if value is None:
        raise StoreError("the database has a meta table but no schema_version")
    return int(value)


def _refuse_newer(found: int) -> None:
    if found > schema.SCHEMA_VERSION:
        raise StoreError(
            f"the database was written by a newer dropkiln (schema {found}; this version "
            f"reads up to {schema.SCHEMA_VERSION}): upgrade dropkiln, the database is left "
            "untouched"
        )


def _create_or_migrate(conn: Connection, *, create: bool) -> None:
    found = _stored_version(conn)
    if found is None:
        if not create:
            raise StoreError("the database has no dropkiln schema")
        schema.metadata.create_all(conn)
        conn.execute(
            schema.meta.insert().values(key="schema_version", value=str(schema.SCHEMA_VERSION))
        )
        return
    _refuse_newer(found)
    for version in range(found + 1, schema.SCHEMA_VERSION + 1):
        MIGRATIONS[version](conn)
        conn.execute(
            schema.meta.update()
            .where(schema.meta.c.key == "schema_version")
            .values(value=str(version))
        )


def ensure_schema(engine: Engine, path: Path, *, create: bool) -> int:
    """Bring the database to SCHEMA_VERSION; refuse one written by a newer dropkiln.

    The version is read first without the write lock, so opening an up-to-date database
    (the common case, e.g. `dropkiln status` while the daemon writes) never waits on it,
    and a refused database is never written to.
    """
    try:
        with engine.connect() as conn:
            found = _stored_version(conn)
        if found is not None:
            _refuse_newer(found)
        elif not create:
            raise StoreError(f"{path} has no dropkiln schema")
        if found != schema.SCHEMA_VERSION:
            with engine.connect().execution_options(write=True) as conn, conn.begin():
                # Again under the write lock: another process may have got here first.
                _create_or_migrate(conn, create=create)
        if engine.dialect.name == "sqlite":
            # Outside any transaction (SQLite refuses the change inside one); persistent.
            raw = engine.raw_connection()
            try:
                raw.driver_connection.execute("PRAGMA journal_mode = WAL")  # type: ignore[union-attr]
            finally:
                raw.close()
    except DatabaseError as exc:
        raise StoreError(f"{path} is not a usable dropkiln database: {exc.orig}") from exc
    return schema.SCHEMA_VERSION
