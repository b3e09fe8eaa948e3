"""Read connections kept between reads, and the gate ``close`` waits at: one mechanism for
every backend (``sqlite.Database``, ``postgres.PostgresDatabase``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from dropkiln.store.errors import StoreError


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class ConnectionPool(Generic[C]):
    """Up to ``keep`` idle connections, made by ``connect``; ``usable`` says whether one may
    be reused. ``enter``/``leave`` bracket every read and write in whatever thread, so that
    ``drain`` can refuse new work and wait for the work still running (also work whose caller
    was cancelled and went away)."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], C],
        keep: int,
        usable: Callable[[C], bool] = lambda _: True,
    ) -> None:
        self.name = name
        self._connect, self._keep, self._usable = connect, keep, usable
        self._idle: list[C] = []
        self._lock = threading.Condition()
        self._closed = False
        self._busy = 0
        """Reads and writes running now, in whatever thread; ``drain`` waits for them."""

    def enter(self) -> None:
        with self._lock:
            if self._closed:
                raise StoreError(f"the store at {self.name} is closed")
            self._busy += 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def borrow(self) -> C:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if self._usable(conn):
                    return conn
                conn.close()
        return self._connect()

    def give_back(self, conn: C) -> None:
        with self._lock:
            if not self._closed and self._usable(conn) and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def drain(self) -> None:
        """Refuse new work, wait for the work still running, close the idle connections.
        Blocking; the backend then closes what it holds besides (its write connection)."""
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self._busy == 0)
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
