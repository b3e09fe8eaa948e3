"""The closed vocabularies of dropkiln: job states, lanes, drop kinds and drop states.

Each is a ``StrEnum``, so a member is the very string stored in SQLite and shown by the
CLI, the API and the dashboard (``JobState.FAILED == "failed"``). This module imports
nothing but the standard library: the CLI, the API and the dashboard use it too.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is, as the ``jobs`` projection and every reader show it."""

    QUEUED = "queued"  #: Ready to run, waiting for its lane.
    WAITING = "waiting"  #: Queued behind jobs it depends on (derived on read, never stored).
    RUNNING = "running"  #: An attempt is running now.
    SUCCEEDED = "succeeded"  #: Finished; its outputs are written.
    FAILED = "failed"  #: Finished without outputs; ``error`` says why; may be retried.
    CANCELLED = "cancelled"  #: Stopped on request (or its dependency was); may be retried.

    @property
    def terminal(self) -> bool:
        """Nothing more happens to the job unless someone asks for a retry."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Lane(StrEnum):
    """Where a job's work runs; each lane has its own capacity."""

    GPU = "gpu"  #: The device: one job at a time, memory-checkpointed retries.
    CPU = "cpu"  #: Plain CPU work (bucketing, video): ``cpu_workers`` at a time.


class DropKind(StrEnum):
    """What a user dropped, by the folder it was dropped into."""

    DATASET = "dataset"  #: A folder of images (and captions): becomes a LoRA.
    PROMPTS = "prompts"  #: A prompt file: becomes images and a video.


class DropState(StrEnum):
    """What ingest made of a drop (the ``drops`` projection)."""

    INGESTED = "ingested"  #: Accepted; its jobs are planned.
    FAILED = "failed"  #: Rejected; moved to ``failed/`` with a NAME.error.txt.
    DUPLICATE = "duplicate"  #: Same content as an earlier drop; no new work.
