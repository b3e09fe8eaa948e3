"""`store copy`: a root's SQLite store into PostgreSQL, the same log and the same check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dropkiln.cli import main
from dropkiln.store import EventStore, StoreError, check
from dropkiln.store import events as ev
from dropkiln.store.backend import open_store
from dropkiln.store.copy import copy_store
from dropkiln.store.events import DAEMON_STREAM, job_stream
from dropkiln.store.schema import PROJECTIONS, events

from .builders import submitted


async def history(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    await store.append(job_stream("b"), [submitted("b", depends_on=["a"], lane="gpu")])
    await store.append(
        job_stream("a"),
        [
            ev.JobStarted(attempt=1, memory_rung=0),
            ev.JobProgress(done=1, total=2, metrics={"loss": 0.25}),
            ev.CheckpointSaved(state={"step": 1, "nested": {"ok": [1, 2]}}),
            ev.JobSucceeded(result={"manifest": "out/m.json"}),
        ],
    )
    await store.append(job_stream("b"), [ev.CancelRequested(by="cli"), ev.JobCancelled()])
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])


async def everything(store: EventStore) -> dict[str, list[dict[str, Any]]]:
    def read(conn: Any) -> dict[str, list[dict[str, Any]]]:
        return {
            table.name: [
                dict(r)
                for r in conn.execute(
                    f"SELECT * FROM {table.name} ORDER BY "
                    + ", ".join(c.name for c in table.primary_key.columns)
                )
            ]
            for table in (events, *PROJECTIONS)
        }

    return await store.snapshot(read)


async def test_a_copy_has_the_same_events_projections_and_check(
    db_path: Path, postgres_url: str
) -> None:
    source = await open_store(db_path, create=True)
    target = await open_store(db_path, postgres_url, create=True)
    try:
        await history(source)
        copied = await copy_store(source, target)
        assert (copied.events, copied.last_seq) == (10, 10)
        assert await everything(target) == await everything(source)
        want, have = await check(source, files=False), await check(target, files=False)
        assert want.ok and have.ok
        assert (have.events, have.rows) == (want.events, want.rows)
        # The next append continues the log after the copied seqs.
        [stored] = await target.append(DAEMON_STREAM, [ev.QueueResumed()])
        assert stored.seq == 11
    finally:
        await source.close()
        await target.close()


async def test_a_copy_into_a_store_with_events_is_refused(db_path: Path, postgres_url: str) -> None:
    source = await open_store(db_path, create=True)
    target = await open_store(db_path, postgres_url, create=True)
    try:
        await history(source)
        await target.append(DAEMON_STREAM, [ev.QueuePaused()])
        with pytest.raises(StoreError, match="already has events"):
            await copy_store(source, target)
        assert [e.type for e in await target.read()] == ["QueuePaused"]
    finally:
        await source.close()
        await target.close()


def test_the_store_copy_command_says_the_check_is_equal(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "home"
    assert main(["init", str(root)]) == 0
    assert main(["--root", str(root), "pause"]) == 0
    capsys.readouterr()
    assert main(["--root", str(root), "store", "copy", "--to", postgres_url]) == 0
    out = capsys.readouterr().out
    assert "copied 1 events" in out
    assert "store check equal on both: 1 events" in out
