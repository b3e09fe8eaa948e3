"""Rebuild replays the log into identical projections; check finds any difference."""

from __future__ import annotations

import asyncio
import importlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from dropkiln.store import EventStore, check, rebuild
from dropkiln.store import events as ev
from dropkiln.store.events import job_stream
from dropkiln.store.schema import PROJECTIONS
from dropkiln.store.sqlite import Connection

from .builders import submitted, tamper
from .histories import History, histories

rebuild_module = importlib.import_module("dropkiln.store.replay")


async def projection_rows(store: EventStore) -> dict[str, list[tuple[Any, ...]]]:
    def work(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
        return {
            t.name: sorted(tuple(r) for r in conn.execute(f"SELECT * FROM {t.name}"))
            for t in PROJECTIONS
        }

    return await store.snapshot(work)


async def two_jobs(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    await store.append(job_stream("b"), [submitted("b", depends_on=["a"]), ev.JobQueued()])
    await store.append(
        job_stream("a"),
        [
            ev.JobStarted(attempt=1, memory_rung=0),
            ev.JobProgress(done=1, total=2, metrics={"loss": 0.5}),
            ev.ArtifactWritten(path="out/m.json", kind="manifest"),
            ev.CheckpointSaved(state={"step": 1}),
        ],
    )


async def test_rebuild_gives_identical_rows(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await two_jobs(store)
    before = await projection_rows(store)
    monkeypatch.setattr(rebuild_module, "CHUNK", 3)  # several chunks
    assert await rebuild(store) == 8
    assert await projection_rows(store) == before
    report = await check(store, files=False)  # the artifact is a made-up path
    assert report.ok
    assert report.differences == []
    assert report.events == 8
    assert report.rows == {"jobs": 2, "drops": 0, "artifacts": 1}


async def test_check_reports_a_tampered_row(store: EventStore) -> None:
    await two_jobs(store)
    before = await projection_rows(store)
    await tamper(store, "UPDATE jobs SET state = 'succeeded', done = 9 WHERE id = 'a'")
    report = await check(store)
    assert not report.ok
    assert report.differences == [
        "jobs[a]: state: live 'succeeded' != rebuilt 'running'; done: live 9 != rebuilt 1"
    ]
    await rebuild(store)
    assert (await check(store, files=False)).ok
    assert await projection_rows(store) == before


async def test_check_reports_missing_and_extra_rows(store: EventStore) -> None:
    await two_jobs(store)
    await tamper(store, "DELETE FROM artifacts")
    await tamper(
        store,
        "INSERT INTO drops (id, kind, name, source, state, at) "
        "VALUES ('ghost', 'dataset', 'g', 'drop/g', 'ingested', 'now')",
    )
    report = await check(store)
    assert sorted(report.differences) == [
        "artifacts[a, out/m.json]: missing from the live projection",
        "drops[ghost]: in the live projection but not produced by the events",
    ]


async def test_check_stops_after_max_differences(store: EventStore) -> None:
    for index in range(5):
        await store.append(job_stream(f"j{index}"), [submitted(f"j{index}")])
    await tamper(store, "UPDATE jobs SET priority = 7")
    assert len((await check(store, max_differences=3)).differences) == 3
    assert len((await check(store)).differences) == 5


async def replay_history(path: Path, history: History) -> None:
    store = await EventStore.open(path, create=True)
    try:
        for index, (stream, new) in enumerate(history):
            if index % 4 == 3:
                # Sometimes through append_batch, as the daemon does for related streams.
                await store.append_batch([(stream, new)])
            else:
                await store.append(stream, new)
        live = await projection_rows(store)
        report = await check(store, files=False)  # histories name made-up artifact paths
        assert report.ok, report.differences
        assert report.events == sum(len(new) for _, new in history)
        await rebuild(store)
        assert await projection_rows(store) == live
    finally:
        await store.close()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories())
def test_live_projections_equal_a_rebuild(history: History) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(replay_history(Path(tmp) / "dropkiln.db", history))
