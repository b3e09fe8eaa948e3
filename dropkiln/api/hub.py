"""One tail of the event log for every ``/v1/events`` client.

A thousand clients each polling SQLite would compete with the daemon for the database;
instead the hub tails the store once and hands each event to every subscriber's bounded
buffer. A subscriber that falls behind (its buffer full) is not slowed down for the others
nor allowed to grow: it is marked lagging and reads what it missed from the store, by
``seq``, like a client resuming with ``Last-Event-ID``. Memory is at most
``buffer × subscribers`` references to events the hub already holds.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dropkiln.api.errors import ApiError
from dropkiln.store import EventStore, StoredEvent

log = logging.getLogger(__name__)

CATCH_UP_BATCH = 500


@dataclass(eq=False)
class Subscriber:
    stream: str | None
    send: MemoryObjectSendStream[StoredEvent]
    receive: MemoryObjectReceiveStream[StoredEvent]
    lagging: bool = field(default=False)


class EventHub:
    def __init__(
        self, store: EventStore, *, buffer: int, max_subscribers: int, poll_interval: float
    ) -> None:
        self.store = store
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        self.poll_interval = poll_interval
        self.position = 0
        """The newest seq the hub has handed out (every event up to it is committed)."""
        self.ready = anyio.Event()
        self._subscribers: set[Subscriber] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def run(self) -> None:
        """Tail the store forever (a task of the server's task group)."""
        self.position = await self.store.last_seq()
        self.ready.set()
        async for event in self.store.tail(self.position, poll_interval=self.poll_interval):
            self.position = event.seq
            for subscriber in self._subscribers:
                if subscriber.lagging or subscriber.stream not in (None, event.stream):
                    continue
                try:
                    subscriber.send.send_nowait(event)
                except anyio.WouldBlock:
                    subscriber.lagging = True

    def events(
        self, after: int, stream: str | None, keep_alive_s: float = 15.0
    ) -> AsyncIterator[StoredEvent | None]:
        """Events with ``seq > after`` (of one stream, if given), forever, in order.

        Yields None when nothing arrived for ``keep_alive_s``, so the caller can send a
        keep-alive. Refuses at once (before any response starts) when too many are open.
        """
        if len(self._subscribers) >= self.max_subscribers:
            raise ApiError("too_many_streams", f"{self.max_subscribers} event streams are open")
        return self._events(after, stream, keep_alive_s)

    async def _events(
        self, after: int, stream: str | None, keep_alive_s: float
    ) -> AsyncIterator[StoredEvent | None]:
        await self.ready.wait()
        send, receive = anyio.create_memory_object_stream[StoredEvent](self.buffer)
        subscriber = Subscriber(stream, send, receive)
        self._subscribers.add(subscriber)
        try:
            while True:
                # Registered first, so nothing after `target` can be missed: it is either in
                # this catch-up read or handed to the buffer later.
                subscriber.lagging = False
                target = self.position
                while True:
                    batch = await self.store.read(after, stream=stream, limit=CATCH_UP_BATCH)
                    for event in batch:
                        yield event
                        after = event.seq
                    if len(batch) < CATCH_UP_BATCH:
                        break
                after = max(after, target)
                while not subscriber.lagging:
                    event_or_none: StoredEvent | None = None
                    with anyio.move_on_after(keep_alive_s):
                        event_or_none = await receive.receive()
                    if event_or_none is None:
                        yield None
                    elif event_or_none.seq > after:
                        yield event_or_none
                        after = event_or_none.seq
                while True:  # lagging: what the buffer holds is re-read from the store
                    try:
                        receive.receive_nowait()
                    except anyio.WouldBlock:
                        break
        finally:
            self._subscribers.discard(subscriber)
            send.close()
            receive.close()
