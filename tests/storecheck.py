"""`store check` after a test: every dropkiln database the test made must follow the job
state machine and replay to its projections. Used as an autouse fixture by the daemon,
integration and reliability tests, so each of them also tests the daemon's history."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dropkiln.store import EventStore, check


async def _check(db: Path, files: bool) -> list[str]:
    async with await EventStore.open(db) as store:
        report = await check(store, files=files)
    return [*report.violations, *report.differences]


def databases_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("state/dropkiln.db"))


@pytest.fixture(autouse=True)
def store_checked_after(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Runs after the test's own fixtures are torn down (daemons stopped)."""
    yield
    files = request.node.get_closest_marker("outputs_gone_after") is None
    problems = {db: anyio.run(_check, db, files) for db in databases_under(tmp_path)}
    broken = {str(db): found for db, found in problems.items() if found}
    assert not broken, f"store check failed after the test: {broken}"
