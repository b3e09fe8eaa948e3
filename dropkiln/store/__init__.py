"""The only code that speaks SQL: events, projections, tail, rebuild, migrations.

Never imports torch: the CLI's read commands and the TUI start from here.
"""

from dropkiln.store import events
from dropkiln.store.commands import COMMANDS, request_command
from dropkiln.store.engine import ConcurrencyError, StoreError
from dropkiln.store.eventstore import EventStore
from dropkiln.store.projections import StoredEvent
from dropkiln.store.queries import (
    DaemonState,
    JobView,
    artifact_by_seq,
    daemon_state,
    drop_by_hash,
    find_job,
    job_artifacts,
    list_drops,
    list_jobs,
    queue_paused,
    recent_telemetry,
    record_telemetry,
    remembered_rung,
    status_report,
    trained_loras,
    unmoved_drops,
    waiting_drops,
)
from dropkiln.store.rebuild import CheckReport, check, rebuild

__all__ = [
    "COMMANDS",
    "CheckReport",
    "ConcurrencyError",
    "DaemonState",
    "EventStore",
    "JobView",
    "StoreError",
    "StoredEvent",
    "artifact_by_seq",
    "check",
    "daemon_state",
    "drop_by_hash",
    "events",
    "find_job",
    "job_artifacts",
    "list_drops",
    "list_jobs",
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
