"""An event as the log holds it, and the streams it belongs to. Standard library only:
every reader imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DAEMON_STREAM = "daemon"
API_STREAM = "api"
WEBHOOK_STREAM = "webhooks"
JOB_PREFIX = "job:"


def job_stream(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def drop_stream(drop_id: str) -> str:
    return f"drop:{drop_id}"


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
        return self.stream.removeprefix(JOB_PREFIX) if self.stream.startswith(JOB_PREFIX) else None
