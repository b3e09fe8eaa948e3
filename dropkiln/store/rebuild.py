"""Recreate the projections from the events alone, and check live ones against a replay."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from dropkiln.store.eventstore import EventStore, _row_event
from dropkiln.store.projections import clear_statements, statements_for
from dropkiln.store.schema import PROJECTIONS, events, metadata

CHUNK = 5000


async def _replay(source: AsyncConnection, target: AsyncConnection) -> int:
    """Apply every event read from ``source`` to the projections in ``target``."""
    after, count = 0, 0
    while True:
        rows = (
            await source.execute(
                select(events).where(events.c.seq > after).order_by(events.c.seq).limit(CHUNK)
            )
        ).all()
        if not rows:
            return count
        for row in rows:
            for statement in statements_for(_row_event(row)):
                await target.execute(statement)
        after = rows[-1].seq
        count += len(rows)


async def rebuild(store: EventStore) -> int:
    """Replace the projections with a replay of the log; returns the events replayed."""
    async with store.writer.begin() as conn:
        for statement in clear_statements():
            await conn.execute(statement)
        return await _replay(conn, conn)


@dataclass
class CheckReport:
    events: int
    rows: dict[str, int] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


async def _rows(conn: AsyncConnection, table: Table) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = [c.name for c in table.primary_key.columns]
    result = await conn.execute(select(table))
    return {tuple(r._mapping[k] for k in keys): dict(r._mapping) for r in result.all()}


async def check(store: EventStore, max_differences: int = 50) -> CheckReport:
    """Replay the log into a scratch database and compare it with the live projections.

    Reads one snapshot and never takes the write lock, so the daemon keeps running.
    """
    scratch = create_async_engine("sqlite+aiosqlite://")
    try:
        async with store.reader.begin() as live, scratch.begin() as replayed:
            await replayed.run_sync(metadata.create_all)
            count = await _replay(live, replayed)
            report = CheckReport(events=count)
            for table in PROJECTIONS:
                want = await _rows(replayed, table)
                have = await _rows(live, table)
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
        await scratch.dispose()


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
