"""The tail of the event log as the dashboard has read it."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from dropkiln.store import StoredEvent

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
