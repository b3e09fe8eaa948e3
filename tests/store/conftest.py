"""Fixtures for the store tests: a fresh store per test, on each backend.

``store`` is parametrized over SQLite (a new file) and PostgreSQL (a new database on the
session's throwaway server), so every test that takes it runs on both. Tests about
SQLite's own file (durability, WAL, migrations of old files) take ``db_path`` instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dropkiln.store import EventStore
from dropkiln.store.backend import open_store

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "dropkiln.db"


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest) -> str:
    """'' for the SQLite file under the root, else a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(db_path: Path, store_url: str) -> AsyncIterator[EventStore]:
    opened = await open_store(db_path, store_url, create=True)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[EventStore]:
    """The SQLite store alone, for tests of SQLite's own behaviour (pragmas, WAL, files)."""
    opened = await EventStore.open(db_path, create=True)
    try:
        yield opened
    finally:
        await opened.close()
