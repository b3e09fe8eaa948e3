"""The event store: append with optimistic concurrency, read, and tail across processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dropkiln.store.engine import ConcurrencyError, StoreError, ensure_schema, make_engine
from dropkiln.store.events import Event, utc_now
from dropkiln.store.projections import StoredEvent, statements_for
from dropkiln.store.schema import events

Batch = Sequence[tuple[str, Sequence[Event]]]


class EventStore:
    """One SQLite database under ``state/``; safe to open from several processes."""

    def __init__(self, path: Path, writer: AsyncEngine, reader: AsyncEngine) -> None:
        self.path = path
        self.writer = writer
        self.reader = reader
        self._appended = anyio.Event()

    @classmethod
    async def open(cls, path: Path, *, create: bool = False) -> EventStore:
        """Open (or with ``create``, make) the database at ``path``."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise StoreError(
                    f"no dropkiln database at {path}: run 'dropkiln init' or start the daemon"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, make_engine(path, writer=True), make_engine(path, writer=False))
        try:
            async with store.writer.begin() as conn:
                await ensure_schema(conn, create=create)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self.writer.dispose()
        await self.reader.dispose()

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # Writing ----------------------------------------------------------------------------

    async def append(
        self, stream: str, new: Sequence[Event], expected_version: int | None = None
    ) -> list[StoredEvent]:
        """Append events to one stream; ``expected_version`` is the version last seen."""
        return await self.append_batch([(stream, new)], {stream: expected_version})

    async def append_batch(
        self, batch: Batch, expected: dict[str, int | None] | None = None
    ) -> list[StoredEvent]:
        """Append to several streams in one transaction (all or nothing)."""
        expected = expected or {}
        try:
            async with self.writer.begin() as conn:
                stored = await self._append_in(conn, batch, expected)
        except IntegrityError as exc:
            raise ConcurrencyError(
                f"another writer appended to {', '.join(s for s, _ in batch)} first"
            ) from exc
        self._appended.set()
        self._appended = anyio.Event()
        return stored

    async def _append_in(
        self, conn: AsyncConnection, batch: Batch, expected: dict[str, int | None]
    ) -> list[StoredEvent]:
        stored: list[StoredEvent] = []
        at = utc_now()
        for stream, new in batch:
            current = await self._stream_version(conn, stream)
            want = expected.get(stream)
            if want is not None and want != current:
                raise ConcurrencyError(
                    f"stream {stream} is at version {current}, expected {want}: "
                    "another writer appended first; nothing was written"
                )
            for event in new:
                current += 1
                data = event.model_dump(mode="json")
                result = await conn.execute(
                    events.insert().values(
                        stream=stream, version=current, type=event.type_name(), data=data, at=at
                    )
                )
                seq = result.inserted_primary_key[0] if result.inserted_primary_key else 0
                row = StoredEvent(int(seq), stream, current, event.type_name(), data, at)
                for statement in statements_for(row):
                    await conn.execute(statement)
                stored.append(row)
        return stored

    @staticmethod
    async def _stream_version(conn: AsyncConnection, stream: str) -> int:
        result = await conn.execute(
            select(func.coalesce(func.max(events.c.version), 0)).where(events.c.stream == stream)
        )
        return int(result.scalar_one())

    # Reading ----------------------------------------------------------------------------

    async def read(
        self,
        after: int = 0,
        *,
        limit: int | None = 1000,
        stream: str | None = None,
        types: Sequence[str] | None = None,
    ) -> list[StoredEvent]:
        """Events with ``seq > after`` in order, optionally of one stream or some types."""
        query = select(events).where(events.c.seq > after).order_by(events.c.seq)
        if stream is not None:
            query = query.where(events.c.stream == stream)
        if types:
            query = query.where(events.c.type.in_(list(types)))
        if limit is not None:
            query = query.limit(limit)
        async with self.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_event(row) for row in rows]

    async def last(
        self, stream: str | None = None, types: Sequence[str] | None = None, limit: int = 1
    ) -> list[StoredEvent]:
        """The newest events (newest first), optionally of one stream or some types."""
        query = select(events).order_by(events.c.seq.desc()).limit(limit)
        if stream is not None:
            query = query.where(events.c.stream == stream)
        if types:
            query = query.where(events.c.type.in_(list(types)))
        async with self.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_event(row) for row in rows]

    async def last_seq(self) -> int:
        async with self.reader.connect() as conn:
            result = await conn.execute(select(func.coalesce(func.max(events.c.seq), 0)))
            return int(result.scalar_one())

    async def stream_version(self, stream: str) -> int:
        async with self.reader.connect() as conn:
            return await self._stream_version(conn, stream)

    async def tail(
        self,
        after: int = 0,
        *,
        poll_interval: float = 0.05,
        stream: str | None = None,
        types: Sequence[str] | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """Every event after ``after``, forever: wakes on local appends at once and on other
        processes' commits within ``poll_interval`` (``PRAGMA data_version`` is cheap)."""
        async with self.reader.connect() as watch:
            seen_version: Any = None
            while True:
                batch = await self.read(after, stream=stream, types=types, limit=500)
                for stored in batch:
                    after = stored.seq
                    yield stored
                if len(batch) == 500:
                    continue
                while True:
                    version = (await watch.exec_driver_sql("PRAGMA data_version")).scalar()
                    if version != seen_version:
                        seen_version = version
                        break
                    with anyio.move_on_after(poll_interval):
                        await self._appended.wait()
                        break


def _row_event(row: Any) -> StoredEvent:
    return StoredEvent(row.seq, row.stream, row.version, row.type, row.data, row.at)
