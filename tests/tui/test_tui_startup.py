"""A fresh dashboard process: no torch, and the benchmark's big store is a faithful one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dropkiln.bench.tui import job_id, make_store, probe
from dropkiln.store import CheckReport, EventStore, check, list_jobs


def test_a_fresh_dashboard_never_imports_torch(history_db: Path) -> None:
    report = probe(history_db, size="80x24")
    assert report["heavy_modules"] == []
    assert report["jobs"] == 6
    assert report["first_render_s"] > 0


def test_benchmark_store_matches_a_replay_of_its_events(tmp_path: Path) -> None:
    db = make_store(tmp_path / "state" / "dropkiln.db", 1000)

    async def read() -> tuple[CheckReport, list[str]]:
        async with await EventStore.open(db) as store:
            report = await check(store, files=False)  # its artifacts are names, not files
            jobs = await list_jobs(store)
            return report, [f"{job.id} {job.state} {job.done}/{job.total}" for job in jobs[:2]]

    report, newest = asyncio.run(read())
    assert report.ok, (report.violations, report.differences)
    assert report.events == 1001
    assert report.rows == {"jobs": 10, "drops": 0, "artifacts": 9}
    assert newest == [f"{job_id(9)} running 97/194", f"{job_id(8)} succeeded 95/95"]
