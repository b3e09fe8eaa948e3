"""What the store needs of a backend: a ``Database``, and connections that run SQL text.

The store's SQL is text with ``:name`` placeholders, run on a DB-API connection as
sqlite3 runs it: SQLite's own (``sqlite``) or PostgreSQL's (``postgres``, which translates
the placeholders).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class SqlCursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SqlConnection(Protocol):
    """sqlite3.Connection's calling convention: ``execute(sql, parameters)``."""

    def execute(self, sql: str, parameters: Any = ..., /) -> SqlCursor: ...

    def close(self) -> None: ...


class CommitWatch(Protocol):
    async def version(self) -> int: ...

    async def changed_since(self, version: int) -> None: ...


class Database(Protocol):
    """One backend's database: reads in one snapshot, serialised writes, commit wake-ups."""

    @property
    def path(self) -> object: ...

    def read(self, work: Callable[[Any], T]) -> T: ...

    def write(self, work: Callable[[Any], T], *, durable: bool = False) -> T: ...

    def append(self, pending: Any, expected: dict[str, int | None], conn: Any) -> Any: ...

    def lock_schema(self, conn: Any) -> None: ...

    def raw_snapshot(self) -> SqlConnection: ...

    def follow_copied_seqs(self, conn: Any) -> None: ...

    def use_wal(self) -> None: ...

    def watch(self, poll_interval: float) -> AbstractAsyncContextManager[CommitWatch]: ...

    def close(self) -> None: ...


__all__ = ["AsyncIterator", "CommitWatch", "Database", "SqlConnection", "SqlCursor"]
