"""Before an attempt starts: the files its dependencies recorded are visible here.

With several boxes on one PostgreSQL store, a job may run on another box than the jobs it
depends on. It finds their files through the artifact records (absolute paths under a ROOT
mounted at the same path on every box). A shared filesystem can show a file late: NFS
caches directory entries and attributes for up to a minute by default (``acdirmax``). So
the executor waits, for ``[executor] input_wait_seconds``, until every recorded input
exists with its recorded size, and only then fails the job, naming the file and the job
that wrote it. Which artifact kinds a stage reads is its ``StageDef.inputs``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from dropkiln.store import EventStore, dependency_artifacts

log = logging.getLogger(__name__)

_FIRST_LOOK_S = 0.1
_LONGEST_LOOK_S = 2.0


@dataclass(frozen=True)
class Input:
    job_id: str
    path: str
    kind: str
    bytes: int | None

    def visible(self) -> bool:
        """It is there with the size its writer recorded (a shared filesystem may show the
        name before the contents)."""
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return False
        return self.bytes is None or size == self.bytes


async def job_inputs(
    store: EventStore, depends_on: Sequence[str], kinds: Sequence[str]
) -> list[Input]:
    if not depends_on or not kinds:
        return []
    rows = await dependency_artifacts(store, depends_on, kinds)
    return [Input(r["job_id"], r["path"], r["kind"], r["bytes"]) for r in rows]


async def wait_for_inputs(
    inputs: Sequence[Input], wait_s: float, stopped: Callable[[], bool]
) -> str | None:
    """None once every input is visible (or the attempt was asked to stop while waiting);
    otherwise, after ``wait_s``, the reason the job fails."""
    missing = [i for i in inputs if not await anyio.to_thread.run_sync(i.visible)]
    if not missing:
        return None
    log.info("waiting up to %.0f s for %d input file(s), first: %s", wait_s, len(missing),
             missing[0].path)  # fmt: skip
    deadline = time.monotonic() + wait_s
    look = _FIRST_LOOK_S
    while missing and not stopped():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await anyio.sleep(min(look, left))
        look = min(look * 2, _LONGEST_LOOK_S)
        missing = [i for i in missing if not await anyio.to_thread.run_sync(i.visible)]
    if not missing or stopped():
        return None
    first = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return (
        f"input file {first.path}{more}, the {first.kind} written by job {first.job_id}, "
        f"is not visible on this box after waiting {wait_s:g} s: if another box wrote it, "
        "mount ROOT at the same path on every box; then retry the job"
    )
