"""Copy one event store into another, e.g. a root's SQLite file into PostgreSQL.

The events are copied as they are (same seq, stream, version, type, data and time), so a
client's ``--since SEQ`` or an event stream resumed by seq means the same on the new
store; the projections are replayed from them in the same transaction, exactly as
``store rebuild`` would make them. Telemetry (device-memory samples kept for an hour) is
not copied. The copy is all or nothing, and only into a store with no events yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dropkiln.store.errors import StoreError
from dropkiln.store.eventstore import EventStore
from dropkiln.store.projections import apply, changes_for
from dropkiln.store.rawsql import SqlConnection
from dropkiln.store.stored import StoredEvent

CHUNK = 5000
_READ = "SELECT seq, stream, version, type, data, at FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
_WRITE = "INSERT INTO events (seq, stream, version, type, data, at) VALUES (?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class CopyReport:
    events: int
    last_seq: int


async def copy_store(source: EventStore, target: EventStore) -> CopyReport:
    """Copy every event of ``source`` into the empty ``target`` and project them there."""
    if await target.last_seq() != 0:
        raise StoreError(
            "the target store already has events: copy only into a new, empty store "
            "(nothing was written)"
        )

    def work(conn: SqlConnection) -> CopyReport:
        reading = source.read_connection()
        try:
            return _copy(reading, conn, target)
        finally:
            reading.close()

    return await target.transaction(work, durable=True)


def _copy(source: SqlConnection, target: SqlConnection, store: EventStore) -> CopyReport:
    if target.execute("SELECT count(*) FROM events").fetchone()[0]:
        raise StoreError("the target store got events while the copy started; nothing written")
    after, count = 0, 0
    while rows := source.execute(_READ, (after, CHUNK)).fetchall():
        for seq, stream, version, type_name, data, at in rows:
            target.execute(_WRITE, (seq, stream, version, type_name, data, at))
            apply(
                target,
                changes_for(StoredEvent(seq, stream, version, type_name, json.loads(data), at)),
            )
        after = rows[-1][0]
        count += len(rows)
    store.follow_copied_seqs(target)
    return CopyReport(events=count, last_seq=after)
