"""Fixtures for PostgreSQL: one throwaway server per test session, one database per test.

Where PostgreSQL's server is not installed the tests that need it are skipped with the
command that installs it, except under CI (CI=true), where they fail: CI installs it
(`bash scripts/install-postgres`, run by the README's test command).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dropkiln.bench.pgserver import NoPostgres, PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer.start()
    except NoPostgres as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the PostgreSQL store: {exc}")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_database(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, postgres_database: str) -> str:
    """The URL of a new, empty schema (a database's worth of tables) on the session's server."""
    return postgres_server.create_schema(postgres_database)
