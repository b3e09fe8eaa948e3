"""The few statements that differ between backends, chosen by the connection at hand.

Work given to ``EventStore.transaction`` or ``snapshot`` receives a connection of the store's
backend; these helpers ask it which backend it is, so the same query code runs on both. A
connection of the PostgreSQL backend says ``backend = "postgresql"``; anything else is
SQLite's own (the SQLite path never imports the PostgreSQL driver).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from dropkiln.store import sqlite

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect


def backend(conn: Any) -> ModuleType:
    if getattr(conn, "backend", None) == "postgresql":
        from dropkiln.store import postgres

        return postgres
    return sqlite


def table_exists(conn: Any, name: str) -> bool:
    return bool(backend(conn).table_exists(conn, name))


def json_number(conn: Any, column: str, *path: str) -> str:
    """An SQL expression: the number at ``path`` inside a JSON column (NULL if absent)."""
    return str(backend(conn).json_number(column, *path))


def ddl_dialect(conn: Any) -> Dialect:
    dialect: Dialect = backend(conn).ddl_dialect()
    return dialect
