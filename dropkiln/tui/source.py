"""Where the dashboard's data comes from: its one store connection, and the log read so far.

The app owns both; screens and widgets get the connection when they are made and the log
through ``data_bind``, so nothing here knows the app.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dropkiln.store import EventStore, StoredEvent, StoreError

T = TypeVar("T")

TAIL_KEEP = 1000
"""Events the tail keeps: as many as the event log shows (its ``max_lines``)."""


@dataclass(frozen=True, eq=False)
class LogTail:
    """The newest events the dashboard has read, oldest first.

    A widget that lagged behind (bound late, or busy) takes what it has not shown yet from
    here, so no batch is lost between two polls. Compared by identity: every poll that reads
    something makes a new one.
    """

    events: tuple[StoredEvent, ...] = ()

    @property
    def upto(self) -> int:
        """Seq of the newest event read, 0 before the first."""
        return self.events[-1].seq if self.events else 0

    def extended(self, batch: list[StoredEvent]) -> LogTail:
        return LogTail((*self.events, *batch)[-TAIL_KEEP:])

    def after(self, seq: int) -> tuple[StoredEvent, ...]:
        """The events newer than ``seq``."""
        return self.events[bisect_right(self.events, seq, key=lambda event: event.seq) :]


class StoreConnection:
    """The dashboard's open store. A call runs to its end even when the worker that made it
    is cancelled, and ``close`` waits for the calls still running."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.store: EventStore | None = None
        self._calls: set[asyncio.Future[Any]] = set()
        self._closing = False

    async def open(self, first: Callable[[EventStore], Awaitable[T]]) -> T:
        """Open the store and run ``first`` on it; if that fails the store is closed again."""
        return await self._shielded(self._open(first))

    async def _open(self, first: Callable[[EventStore], Awaitable[T]]) -> T:
        store = await EventStore.open(self.db_path)
        try:
            result = await first(store)
        except BaseException:
            await store.close()
            raise
        self.store = store
        return result

    async def call(self, work: Callable[[EventStore], Awaitable[T]]) -> T:
        """Run ``work`` on the open store; cancelling the caller does not cut it off."""
        if self.store is None:
            raise StoreError(f"the store at {self.db_path} is not open")
        return await self._shielded(work(self.store))

    async def close(self) -> None:
        self._closing = True
        while self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def _shielded(self, work: Awaitable[T]) -> T:
        # A query abandoned inside the SQLite driver (its worker cancelled on quit) leaves a
        # connection behind that later calls into a closed loop: let every call finish, and
        # have close() wait for the ones still running before it closes the store.
        if self._closing:
            if asyncio.iscoroutine(work):
                work.close()
            raise StoreError("the dashboard is closing")
        task = asyncio.ensure_future(work)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return await asyncio.shield(task)
