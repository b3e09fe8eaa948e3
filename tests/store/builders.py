"""Event builders shared by the store tests."""

from __future__ import annotations

from typing import Any

from dropkiln.store import EventStore
from dropkiln.store.events import JobSubmitted


def submitted(job_id: str, **overrides: Any) -> JobSubmitted:
    """A JobSubmitted with plausible defaults."""
    fields: dict[str, Any] = {
        "job_id": job_id,
        "stage": "bucket",
        "name": f"cats-{job_id}",
        "lane": "cpu",
        "priority": 0,
        "spec": {"dataset": f"/drop/{job_id}"},
    }
    fields.update(overrides)
    return JobSubmitted(**fields)


async def tamper(store: EventStore, sql: str) -> None:
    """Change rows behind the store's back, as a bug or a hand edit would, on any backend."""
    await store.transaction(lambda conn: conn.execute(sql))
