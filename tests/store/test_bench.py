"""The store benchmark runs, and its bulk-made store is one a live run could have written."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropkiln.bench.store import bench_store, make_big_store, report
from dropkiln.store import EventStore, check, list_jobs


async def test_the_bulk_store_matches_a_replay(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    made = make_big_store(path, 5000, events_per_job=120)
    store = await EventStore.open(path)
    try:
        report_ = await check(store, files=False)  # its artifacts are names, not files
        assert report_.ok, (report_.violations, report_.differences)
        assert report_.events == made
        assert made > 4900
        states = [job.state for job in await list_jobs(store, limit=3)]
        assert states == ["waiting", "queued", "running"]
    finally:
        await store.close()


@pytest.mark.slow
def test_bench_store_reports_every_figure(tmp_path: Path) -> None:
    figures = bench_store(
        single=30, batches=3, batch_size=10, tail_samples=5, status_events=2000, workdir=tmp_path
    )
    measured = ("single_commits_per_s", "durable_commits_per_s", "batched_events_per_s")
    for name in (*measured, "tail_p95_ms", "status_s"):
        assert figures[name] > 0
    assert len(report(figures, 10)) == 13
    assert list(tmp_path.iterdir()) == []
