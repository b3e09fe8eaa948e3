"""Replays of the log: recreate the projections from the events alone (``rebuild``); check
live ones against a replay, and the log itself against the job state machine (``check``;
``statemachine`` is independent of the projections)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from sqlalchemy import JSON, Table
from sqlalchemy.schema import CreateIndex, CreateTable

from dropkiln.store.eventstore import EVENT_COLUMNS, EventStore
from dropkiln.store.projections import apply, changes_for, clear
from dropkiln.store.rawsql import SqlConnection
from dropkiln.store.schema import PROJECTIONS
from dropkiln.store.sqlite import ddl_dialect
from dropkiln.store.statemachine import check_state_machine
from dropkiln.store.stored import StoredEvent

CHUNK = 5000


def _replay(source: SqlConnection, target: SqlConnection) -> int:
    """Apply every event read from ``source`` to the projections in ``target``."""
    after, count = 0, 0
    while True:
        rows = source.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > :after ORDER BY seq LIMIT :chunk",
            {"after": after, "chunk": CHUNK},
        ).fetchall()
        if not rows:
            return count
        for seq, stream, version, type_name, data, at in rows:
            event = StoredEvent(seq, stream, version, type_name, json.loads(data), at)
            apply(target, changes_for(event))
        after = rows[-1][0]
        count += len(rows)


async def rebuild(store: EventStore) -> int:
    """Replace the projections with a replay of the log; returns the events replayed."""

    def work(conn: sqlite3.Connection) -> int:
        clear(conn)
        return _replay(conn, conn)

    return await store.transaction(work)


@dataclass
class CheckReport:
    events: int
    rows: dict[str, int] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)
    """Projection rows that differ from a replay of the events."""
    violations: list[str] = field(default_factory=list)
    """Breaks of the state machine: illegal transitions, double endings, version gaps,
    artifacts missing or changed."""

    @property
    def ok(self) -> bool:
        return not self.differences and not self.violations


def _scratch() -> sqlite3.Connection:
    """An in-memory database with the projection tables, to replay into."""
    scratch = sqlite3.connect(":memory:", isolation_level=None)
    dialect = ddl_dialect()
    for table in PROJECTIONS:
        scratch.execute(str(CreateTable(table).compile(dialect=dialect)))
        for index in table.indexes:
            scratch.execute(str(CreateIndex(index).compile(dialect=dialect)))
    return scratch


def _rows(conn: SqlConnection, table: Table) -> dict[tuple[Any, ...], dict[str, Any]]:
    names = [c.name for c in table.columns]
    keys = [c.name for c in table.primary_key.columns]
    json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for values in conn.execute(f"SELECT {', '.join(names)} FROM {table.name}"):
        row = {
            name: json.loads(value) if name in json_columns and value is not None else value
            for name, value in zip(names, values, strict=True)
        }
        rows[tuple(row[k] for k in keys)] = row
    return rows


def _check(store: EventStore, max_differences: int, files: bool) -> CheckReport:
    # One read snapshot for the state machine, the replay and the live rows; never the
    # write lock, so the daemon keeps running while this runs.
    live = store.read_connection()
    scratch = _scratch()
    try:
        scratch.execute("BEGIN")
        violations = check_state_machine(live, store.root, files)
        report = CheckReport(events=_replay(live, scratch), violations=violations)
        for table in PROJECTIONS:
            want = _rows(scratch, table)
            have = _rows(live, table)
            report.rows[table.name] = len(have)
            for key in sorted(want.keys() | have.keys(), key=repr):
                if want.get(key) != have.get(key):
                    report.differences.append(
                        _describe(table.name, key, have.get(key), want.get(key))
                    )
                    if len(report.differences) >= max_differences:
                        return report
        return report
    finally:
        live.close()
        scratch.close()


async def check(store: EventStore, max_differences: int = 50, files: bool = True) -> CheckReport:
    """Check the log against the state machine (with ``files``, artifacts against the disk),
    replay it into a scratch database and compare that with the live projections."""
    return await anyio.to_thread.run_sync(_check, store, max_differences, files)


def _describe(
    table: str, key: tuple[Any, ...], live: dict[str, Any] | None, rebuilt: dict[str, Any] | None
) -> str:
    name = f"{table}[{', '.join(map(str, key))}]"
    if live is None:
        return f"{name}: missing from the live projection"
    if rebuilt is None:
        return f"{name}: in the live projection but not produced by the events"
    fields = [k for k in live if live[k] != rebuilt.get(k)]
    detail = "; ".join(f"{k}: live {live[k]!r} != rebuilt {rebuilt.get(k)!r}" for k in fields)
    return f"{name}: {detail}"
