"""The dashboard on a PostgreSQL store: the same jobs and log as on SQLite, and it follows."""

from __future__ import annotations

from pathlib import Path

from dropkiln.store import events as ev
from dropkiln.store.backend import open_store
from dropkiln.store.events import job_stream
from dropkiln.tui.app import DropkilnApp
from dropkiln.tui.widgets import JobsTable
from tests.store.builders import submitted
from tests.tui.conftest import loaded, wait_for


async def test_the_dashboard_reads_and_follows_a_postgresql_store(
    tmp_path: Path, postgres_url: str
) -> None:
    db = tmp_path / "state" / "dropkiln.db"  # not made: the events live in PostgreSQL
    store = await open_store(db, postgres_url, create=True)
    try:
        await store.append(
            job_stream("a1"), [submitted("a1"), ev.JobStarted(attempt=1, memory_rung=0)]
        )
        app = DropkilnApp(db, poll_interval=0.05, store_url=postgres_url)
        async with app.run_test(size=(100, 30)) as pilot:
            await loaded(pilot)
            assert [job.id for job in app.jobs] == ["a1"]
            assert str(app.screen.query_one(JobsTable).get_cell("a1", "state")) == "running"
            await store.append(job_stream("a1"), [ev.JobSucceeded(result={})])
            await wait_for(pilot, lambda: app.jobs and app.jobs[0].state == "succeeded")
        assert not db.exists()
    finally:
        await store.close()
