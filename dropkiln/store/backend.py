"""Which event store a root uses: its SQLite file, or the PostgreSQL named by ``store_url``."""

from __future__ import annotations

import functools
from pathlib import Path

from dropkiln.store.errors import StoreError
from dropkiln.store.eventstore import EventStore

POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).split(":", 1)[0].split("+", 1)[0] in POSTGRES_SCHEMES


async def open_store(
    db: Path, store_url: str = "", *, create: bool = False, inline: bool = False
) -> EventStore:
    """The store for the root whose SQLite file is ``db`` (ROOT/state/dropkiln.db).

    An empty ``store_url`` is that file; ``postgresql://…`` is a shared PostgreSQL
    database, with the root (outputs, work folders) on a filesystem every box mounts.
    ``inline``: see ``EventStore``."""
    if not store_url:
        return await EventStore.open(db, create=create, inline=inline)
    if not is_postgres_url(store_url):
        raise StoreError(
            f"store_url {store_url.split('@')[-1]!r} is not a postgresql:// URL "
            "(leave it empty for the SQLite file under state/)"
        )
    try:
        from dropkiln.store.postgres import PostgresDatabase
    except ImportError as exc:
        raise StoreError(
            f"store_url names PostgreSQL but its driver is missing ({exc}): "
            "pip install 'dropkiln[postgres]'"
        ) from exc
    from dropkiln.store.migrate import ensure_schema

    database = PostgresDatabase(store_url)
    store = EventStore(Path(db), database, inline=inline)
    try:
        await store.call(functools.partial(ensure_schema, database, create=create))
    except BaseException:
        database.close()
        raise
    return store
