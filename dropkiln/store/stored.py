"""An event as the log holds it. Standard library only: every reader imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: its place in the log and its raw data."""

    seq: int
    stream: str
    version: int
    type: str
    data: dict[str, Any]
    at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "at": self.at,
            "data": self.data,
        }

    @property
    def job_id(self) -> str | None:
        return self.stream[4:] if self.stream.startswith("job:") else None
