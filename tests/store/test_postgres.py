"""What the PostgreSQL store does beyond the shared store tests (which run on both backends):
its tail's wake-ups, its migrations, and being chosen by ``store_url``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from dropkiln.cli import main
from dropkiln.store import StoredEvent, StoreError, migrate, postgres
from dropkiln.store import events as ev
from dropkiln.store.backend import open_store
from dropkiln.store.events import DAEMON_STREAM

from .test_tail import take


async def test_a_commit_on_another_connection_wakes_the_tail(
    db_path: Path, postgres_url: str
) -> None:
    """NOTIFY crosses connections (another box's daemon): no polling needed to see it."""
    reader = await open_store(db_path, postgres_url, create=True)
    writer = await open_store(db_path, postgres_url)
    got: list[StoredEvent] = []
    tail = reader.tail(poll_interval=60)
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(take, tail, 1, got)
                await anyio.sleep(0.3)  # the tail is idle, listening
                await writer.append(DAEMON_STREAM, [ev.QueuePaused()])
    finally:
        await tail.aclose()
        await reader.close()
        await writer.close()
    assert [e.type for e in got] == ["QueuePaused"]


async def test_the_tail_polls_when_notifications_cannot_arrive(
    db_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_listener(watch: postgres.NotifyWatch) -> None:
        watch._listener = None  # as behind a pooler in transaction mode: LISTEN does nothing

    monkeypatch.setattr(postgres.NotifyWatch, "listen", no_listener)
    store = await open_store(db_path, postgres_url, create=True)
    got: list[StoredEvent] = []
    tail = store.tail(poll_interval=0.1)
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(take, tail, 2, got)
                await anyio.sleep(0.3)
                await store.append(DAEMON_STREAM, [ev.QueuePaused()])
                await anyio.sleep(0.3)
                await store.append(DAEMON_STREAM, [ev.QueueResumed()])
    finally:
        await tail.aclose()
        await store.close()
    assert [e.type for e in got] == ["QueuePaused", "QueueResumed"]


def _indexes(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename IN ('events', 'jobs')"
        )
        return {row[0] for row in rows}


async def test_a_schema_1_database_is_migrated_forward(db_path: Path, postgres_url: str) -> None:
    store = await open_store(db_path, postgres_url, create=True)
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])
    await store.close()
    # Back to schema 1, as a database made before the lookup indexes existed.
    with psycopg.connect(postgres_url) as conn:
        conn.execute("DROP INDEX ix_events_type")
        conn.execute("DROP INDEX ix_jobs_submitted")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    assert {"ix_events_type", "ix_jobs_submitted"}.isdisjoint(_indexes(postgres_url))
    store = await open_store(db_path, postgres_url)
    try:
        assert [e.type for e in await store.read()] == ["QueuePaused"]
    finally:
        await store.close()
    assert {"ix_events_type", "ix_jobs_submitted"} <= _indexes(postgres_url)
    with psycopg.connect(postgres_url) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(migrate.SCHEMA_VERSION),)


async def test_a_failing_migration_leaves_the_database_as_it_was(
    db_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(db_path, postgres_url, create=True)
    await store.close()

    def half_done(conn: Any) -> None:
        conn.execute("ALTER TABLE drops ADD COLUMN note TEXT")
        raise RuntimeError("the migration broke half-way")

    monkeypatch.setattr(migrate, "SCHEMA_VERSION", migrate.SCHEMA_VERSION + 1)
    monkeypatch.setitem(migrate.MIGRATIONS, migrate.SCHEMA_VERSION, half_done)
    with pytest.raises(RuntimeError, match="half-way"):
        await open_store(db_path, postgres_url)
    with psycopg.connect(postgres_url) as conn:
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'drops'"
        ).fetchall()
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert ("note",) not in columns  # PostgreSQL's DDL is transactional: all or nothing
    assert version == (str(migrate.SCHEMA_VERSION - 1),)


async def test_a_url_that_is_not_postgresql_is_refused(db_path: Path) -> None:
    with pytest.raises(StoreError, match="not a postgresql:// URL"):
        await open_store(db_path, "mysql://someone@db/kiln")


def test_store_url_in_the_settings_points_every_command_at_postgresql(
    tmp_path: Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "home"
    monkeypatch.setenv("DROPKILN_STORE_URL", postgres_url)
    assert main(["init", str(root)]) == 0
    assert not (root / "state" / "dropkiln.db").exists()  # the events live in PostgreSQL
    assert main(["--root", str(root), "pause"]) == 0
    capsys.readouterr()
    assert main(["--root", str(root), "events", "--json"]) == 0
    assert '"type": "QueuePaused"' in capsys.readouterr().out
    assert main(["--root", str(root), "store", "check"]) == 0
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT type FROM events").fetchall()
    assert rows == [("QueuePaused",)]


def _drop_other_connections(url: str) -> int:
    """What a server restart or an idle timeout does to every connection but this one."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


async def test_appends_and_the_tail_go_on_after_the_server_drops_their_connections(
    db_path: Path, postgres_url: str
) -> None:
    store = await open_store(db_path, postgres_url, create=True)
    got: list[StoredEvent] = []
    tail = store.tail(poll_interval=0.2)
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(take, tail, 2, got)
                await store.append(DAEMON_STREAM, [ev.QueuePaused()])
                while not got:
                    await anyio.sleep(0.05)
                assert _drop_other_connections(postgres_url) >= 2  # the writer, the listener
                await anyio.sleep(0.3)
                await store.append(DAEMON_STREAM, [ev.QueueResumed()])
    finally:
        await tail.aclose()
        await store.close()
    assert [e.type for e in got] == ["QueuePaused", "QueueResumed"]


async def test_only_commits_an_irreversible_step_follows_wait_for_the_wal_flush(
    db_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's counterpart of SQLite's synchronous FULL for those commits, NORMAL else."""
    store = await open_store(db_path, postgres_url, create=True)
    try:

        def setting(conn: Any) -> str:
            return str(conn.execute("SELECT current_setting('synchronous_commit')").fetchone()[0])

        assert await store.transaction(setting, durable=True) == "on"
        assert await store.transaction(setting) == "off"
        seen: list[bool] = []
        plain_transaction = store.transaction

        async def spy(work: Any, *, durable: bool = False) -> Any:
            seen.append(durable)
            return await plain_transaction(work, durable=durable)

        monkeypatch.setattr(store, "transaction", spy)
        await store.append(DAEMON_STREAM, [ev.QueuePaused()])
        dropped = ev.Dropped(
            drop_id="d1", kind="dataset", name="cats", source="drop/datasets/cats",
            stored="drop/processed/d1-cats", hash="h", files=1, bytes=1,
        )  # fmt: skip
        await store.append("drop:d1", [dropped])  # the drop is moved once this returns
        assert seen == [False, True]
    finally:
        await store.close()
