"""Fixtures for the store tests: a fresh database file per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dropkiln.store import EventStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "dropkiln.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[EventStore]:
    opened = await EventStore.open(db_path, create=True)
    try:
        yield opened
    finally:
        await opened.close()
