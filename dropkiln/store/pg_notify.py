"""How a PostgreSQL store's tail hears of another's commit: LISTEN on the channel every
append NOTIFYs, and polling where the server will not have a listener."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg

CHANNEL = "dropkiln_events"


class NotifyWatch:
    """Wakes a tail on another commit: NOTIFY, else every ``poll_interval``."""

    def __init__(self, url: str, poll_interval: float) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._seen = 0

    async def listen(self) -> None:
        """Start listening, or leave it to polling when the server will not have it."""
        try:
            listener = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            await listener.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error:
            self._listener = None
            return
        self._listener = listener

    async def version(self) -> int:
        """Notifications seen so far (those already waiting count)."""
        await self._take(timeout=0)
        return self._seen

    async def changed_since(self, version: int) -> None:
        """Return after a notification newer than ``version``, or after poll_interval."""
        if self._seen > version:
            return
        if self._listener is None:
            await anyio.sleep(self.poll_interval)
            await self.listen()  # before the next read, so no commit goes unnoticed
            return
        await self._take(timeout=self.poll_interval)

    async def _take(self, timeout: float) -> None:
        if self._listener is None:
            return
        try:
            async for _ in self._listener.notifies(timeout=timeout or 0.001, stop_after=1):
                self._seen += 1
        except psycopg.Error:
            await self._listener.close()
            self._listener = None
            self._seen += 1  # something may have been missed: read again

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
