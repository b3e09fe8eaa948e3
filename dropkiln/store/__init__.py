"""The only code that speaks SQL: events, projections, tail, rebuild, migrations.

Never imports torch: the CLI's read commands and the TUI start from here. Names load their
module on first use (PEP 562), so `dropkiln status` pays only for what it reads: the read
path never imports SQLAlchemy, which only generates DDL (``migrate``, ``rebuild``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dropkiln.store import events
    from dropkiln.store.commands import COMMANDS, request_command
    from dropkiln.store.errors import ConcurrencyError, StoreError
    from dropkiln.store.eventstore import EventStore
    from dropkiln.store.queries import (
        JobView,
        ProgressHistory,
        artifact_by_seq,
        clean_runs,
        dependency_artifacts,
        drop_by_hash,
        find_job,
        job_artifacts,
        list_drops,
        list_jobs,
        progress_history,
        queue_paused,
        remembered_rung,
        status_report,
        trained_loras,
        unmoved_drops,
        waiting_drops,
    )
    from dropkiln.store.replay import CheckReport, check, rebuild
    from dropkiln.store.stored import StoredEvent
    from dropkiln.store.telemetry import (
        DaemonState,
        TelemetrySample,
        daemon_state,
        recent_telemetry,
        record_telemetry,
    )

_HOMES = {
    "events": "",
    "COMMANDS": "commands",
    "request_command": "commands",
    "ConcurrencyError": "errors",
    "StoreError": "errors",
    "EventStore": "eventstore",
    "StoredEvent": "stored",
    "CheckReport": "replay",
    "check": "replay",
    "rebuild": "replay",
    **dict.fromkeys(
        ("DaemonState", "TelemetrySample", "daemon_state", "recent_telemetry", "record_telemetry"),
        "telemetry",
    ),
    **dict.fromkeys(
        (
            "JobView",
            "ProgressHistory",
            "artifact_by_seq",
            "clean_runs",
            "dependency_artifacts",
            "drop_by_hash",
            "find_job",
            "job_artifacts",
            "list_drops",
            "list_jobs",
            "progress_history",
            "queue_paused",
            "remembered_rung",
            "status_report",
            "trained_loras",
            "unmoved_drops",
            "waiting_drops",
        ),
        "queries",
    ),
}

__all__ = [
    "COMMANDS",
    "CheckReport",
    "ConcurrencyError",
    "DaemonState",
    "EventStore",
    "JobView",
    "ProgressHistory",
    "StoreError",
    "StoredEvent",
    "TelemetrySample",
    "artifact_by_seq",
    "check",
    "clean_runs",
    "daemon_state",
    "dependency_artifacts",
    "drop_by_hash",
    "events",
    "find_job",
    "job_artifacts",
    "list_drops",
    "list_jobs",
    "progress_history",
    "queue_paused",
    "rebuild",
    "recent_telemetry",
    "record_telemetry",
    "remembered_rung",
    "request_command",
    "status_report",
    "trained_loras",
    "unmoved_drops",
    "waiting_drops",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not home:
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
