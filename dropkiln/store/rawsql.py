"""What the store's hand-written SQL needs of a connection, on either backend.

The hot paths (appending, projecting, replaying, checking) run SQL text with ``?`` and
``:name`` placeholders on a DB-API connection in autocommit mode that says BEGIN and
COMMIT itself: sqlite3's own connection, or PostgreSQL's through ``postgres.PgConnection``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class SqlCursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SqlConnection(Protocol):
    """sqlite3.Connection's calling convention: ``execute(sql, parameters)``."""

    def execute(self, sql: str, parameters: Any = ..., /) -> SqlCursor: ...

    def close(self) -> None: ...
