"""Projection rows as plain data, and the SQL that writes them. Standard library only.

A command written by `dropkiln cancel` must answer in a quarter of a second, so the write
path loads neither SQLAlchemy nor pydantic for it: what the SQL needs of the schema (each
projection's name and its JSON columns) is stated here, and a test holds it to
``schema.py``; a command's projection needs nothing but its type (``commands``). Every
other event is read as its typed event (``projections``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dropkiln.store.rawsql import SqlConnection
from dropkiln.store.stored import StoredEvent


@dataclass(frozen=True)
class Projection:
    """A projection table as the write path sees it (``schema.py`` has the whole of it)."""

    name: str
    json_columns: frozenset[str] = frozenset()
    """Written as JSON text (read connections decode them)."""


jobs = Projection("jobs", frozenset({"depends_on", "spec", "metrics", "checkpoint", "result"}))
drops = Projection("drops")
artifacts = Projection("artifacts")
PROJECTIONS = (jobs, drops, artifacts)
"""Parents first (``clear`` empties children first)."""


@dataclass(frozen=True)
class RowChange:
    """One projection row written: inserted, updated by its key, or upserted on its key."""

    table: Projection
    action: Literal["insert", "update", "upsert"]
    values: Mapping[str, Any]
    key: tuple[str, ...] = ()


Changes = list[RowChange]


def job_update(stored: StoredEvent, **values: Any) -> Changes:
    values.update(id=stored.job_id, version=stored.version, updated_at=stored.at)
    return [RowChange(jobs, "update", values, key=("id",))]


@functools.cache
def _sql(table: Projection, action: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    # Column names come from the projectors above, never from event data; a wrong one is
    # refused by the database ("no such column").
    if action == "update":
        assignments = ", ".join(f"{c} = :{c}" for c in columns if c not in key)
        where = " AND ".join(f"{k} = :{k}" for k in key)
        return f"UPDATE {table.name} SET {assignments} WHERE {where}"
    insert = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join(f':{c}' for c in columns)})"
    )
    if action == "insert":
        return insert
    assignments = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return f"{insert} ON CONFLICT ({', '.join(key)}) DO UPDATE SET {assignments}"


def apply(connection: SqlConnection, changes: Iterable[RowChange]) -> None:
    """Write the changes on a connection that is inside a write transaction."""
    for change in changes:
        json_columns = change.table.json_columns
        params = {
            name: json.dumps(value) if name in json_columns and value is not None else value
            for name, value in change.values.items()
        }
        sql = _sql(change.table, change.action, tuple(change.values), change.key)
        connection.execute(sql, params)


def clear(connection: SqlConnection) -> None:
    """Empty every projection (children first), inside a write transaction."""
    for table in reversed(PROJECTIONS):
        connection.execute(f"DELETE FROM {table.name}")


def changes_for(stored: StoredEvent) -> Changes:
    """The projection changes one event causes (live and in rebuild alike)."""
    from dropkiln.store.commands import command_changes

    changes = command_changes(stored)
    if changes is not None:
        return changes
    from dropkiln.store.projections import typed_changes

    return typed_changes(stored)
