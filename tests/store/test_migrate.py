"""Schema versions: new databases, forward migrations, and refusing a newer database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dropkiln.store import EventStore, StoreError, check, list_jobs, migrate
from dropkiln.store import events as ev
from dropkiln.store.events import DAEMON_STREAM
from dropkiln.store.sqlite import Connection


def stored_version(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(
            conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        )


def columns(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


async def make_database(path: Path) -> None:
    store = await EventStore.open(path, create=True)
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])
    await store.close()


async def test_a_new_database_records_its_schema_version(db_path: Path) -> None:
    await make_database(db_path)
    assert stored_version(db_path) == str(migrate.SCHEMA_VERSION)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_opening_a_missing_database_without_create_says_so(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "dropkiln.db"
    with pytest.raises(StoreError, match=r"no dropkiln database at .*dropkiln init"):
        await EventStore.open(path)
    assert not path.exists()
    assert not path.parent.exists()


async def test_a_database_from_a_newer_dropkiln_is_refused_untouched(db_path: Path) -> None:
    await make_database(db_path)
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'",
            (str(migrate.SCHEMA_VERSION + 1),),
        )
    before = db_path.read_bytes()
    for create in (False, True):
        with pytest.raises(StoreError, match="newer dropkiln") as caught:
            await EventStore.open(db_path, create=create)
        assert f"schema {migrate.SCHEMA_VERSION + 1}" in str(caught.value)
        assert "left untouched" in str(caught.value)
    assert db_path.read_bytes() == before


async def test_an_old_database_is_migrated_forward(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_database(db_path)
    ran: list[int] = []

    def add_note(conn: Connection) -> None:
        ran.append(1)
        conn.execute("ALTER TABLE drops ADD COLUMN note TEXT")

    monkeypatch.setattr(migrate, "SCHEMA_VERSION", migrate.SCHEMA_VERSION + 1)
    monkeypatch.setitem(migrate.MIGRATIONS, migrate.SCHEMA_VERSION, add_note)
    for _ in range(2):
        store = await EventStore.open(db_path)
        assert [e.type for e in await store.read()] == ["QueuePaused"]
        await store.close()
    assert ran == [1]
    assert stored_version(db_path) == str(migrate.SCHEMA_VERSION)
    assert "note" in columns(db_path, "drops")


async def test_a_failed_migration_leaves_the_old_schema(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_database(db_path)
    old = stored_version(db_path)

    def half_done(conn: Connection) -> None:
        conn.execute("ALTER TABLE drops ADD COLUMN note TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(migrate, "SCHEMA_VERSION", migrate.SCHEMA_VERSION + 1)
    monkeypatch.setitem(migrate.MIGRATIONS, migrate.SCHEMA_VERSION, half_done)
    with pytest.raises(RuntimeError, match="migration bug"):
        await EventStore.open(db_path)
    assert stored_version(db_path) == old
    assert "note" not in columns(db_path, "drops")


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dropkiln.db"
    path.write_bytes(b"this is not sqlite, just some text that happens to be here" * 20)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a usable dropkiln database"):
        await EventStore.open(path, create=True)
    assert path.read_bytes() == before


async def test_a_database_without_our_schema_is_not_adopted_silently(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something (x)")
    with pytest.raises(StoreError, match="has no dropkiln schema"):
        await EventStore.open(path)


async def test_a_schema_1_database_gains_the_lookup_indexes(db_path: Path) -> None:
    await make_database(db_path)
    with sqlite3.connect(db_path) as conn:
        # What the first release wrote: the same tables without the two lookup indexes.
        conn.execute("DROP INDEX ix_events_type")
        conn.execute("DROP INDEX ix_jobs_submitted")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store = await EventStore.open(db_path)
    await store.close()
    assert stored_version(db_path) == str(migrate.SCHEMA_VERSION)
    with sqlite3.connect(db_path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"ix_events_type", "ix_jobs_submitted"} <= names


async def test_a_schema_2_database_gains_leases_and_the_claiming_executor(db_path: Path) -> None:
    await make_database(db_path)
    with sqlite3.connect(db_path) as conn:
        # What schema 2 had: no leases table, no jobs.executor.
        conn.execute("DROP TABLE leases")
        conn.execute("ALTER TABLE jobs DROP COLUMN executor")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    store = await EventStore.open(db_path)
    await store.close()
    assert stored_version(db_path) == str(migrate.SCHEMA_VERSION)
    with sqlite3.connect(db_path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert "leases" in names and "executor" in columns


async def test_a_schema_3_database_gains_the_device_class_jobs_are_pinned_to(
    db_path: Path,
) -> None:
    store = await EventStore.open(db_path, create=True)
    old = ev.JobSubmitted(job_id="old", stage="steps", name="old", lane="gpu", priority=0, spec={})
    await store.append("job:old", [old])
    await store.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("ALTER TABLE jobs DROP COLUMN device_class")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store = await EventStore.open(db_path)
    try:
        [job] = await list_jobs(store)
        assert job.device_class is None  # a job submitted before pins runs anywhere
        assert (await check(store)).ok
    finally:
        await store.close()
    assert stored_version(db_path) == "4"
