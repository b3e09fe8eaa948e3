"""Which executor a GPU job should run on: the one whose device has room for it.

Every executor competes for every job it serves; the first claim wins. For a GPU job that
is not enough on a box with cards of different sizes: an idle 12 GB card would take a
training run that a free 24 GB card could run without gradient checkpointing. So before
claiming a GPU job, an executor works out the rung the stage's estimate
(``stages/starting_rung.py``) would start it on here, and on each other live executor's
device from that device's newest telemetry sample (its free memory), never above the
rung the job would start on anyway (remembered, or its retry's). When another device
would start it on a higher rung (less memory saved, faster), this executor leaves the job
to that one, for ``[executor] lease_seconds`` at most from when it first did: then it
claims it anyway and steps down rungs as usual, so a job never starves because the roomier
device is busy, stopped, or judged wrongly.

An executor is live while its samples are fresh: younger than FRESH_SAMPLES times its
sampling interval (the idle one, the longest). CPU-lane jobs are not steered: every
executor competes for them, which spreads them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dropkiln.stages import StageDef
from dropkiln.stages.device import memory_snapshot
from dropkiln.stages.starting_rung import StartFacts
from dropkiln.store import JobView, remembered_rung
from dropkiln.store.telemetry import IDLE_TELEMETRY_S, device_rooms
from dropkiln.store.vocabulary import Lane

if TYPE_CHECKING:
    from dropkiln.daemon.executor import Executor

log = logging.getLogger(__name__)

FRESH_SAMPLES = 3
"""A sample older than this many sampling intervals means its daemon is gone or hung."""


@dataclass(frozen=True)
class DeviceRoom:
    """Another executor's device as its newest telemetry sample shows it."""

    executor: str
    device_class: str | None
    device: str
    free: int | None
    """Bytes free on the device when sampled."""
    age_s: float
    """Seconds since that sample."""


def roomier(
    mine: int,
    rooms: Sequence[DeviceRoom],
    rung_on: Callable[[int], int],
    pinned_to: str | None,
    fresh_s: float,
    waited_s: float,
    bound_s: float,
) -> DeviceRoom | None:
    """The device to leave a GPU job to, or None to claim it here now.

    ``mine`` is the rung the job would start on here; ``rung_on(free)`` the rung it would
    start on with ``free`` bytes; ``pinned_to`` the job's device class (None: any). Only a
    live (``age_s < fresh_s``) GPU of the pinned class whose rung is strictly higher than
    ``mine`` counts, and only while the job has been left less than ``bound_s``.
    """
    if waited_s >= bound_s or mine == 0:
        return None
    best: tuple[int, int, str] | None = None
    chosen: DeviceRoom | None = None
    for room in rooms:
        if room.free is None or room.age_s >= fresh_s or not room.device.startswith("cuda"):
            continue
        if pinned_to is not None and room.device_class != pinned_to:
            continue
        rung = rung_on(room.free)
        # The lowest rung wins; among equals the most free memory, then the id (stable).
        key = (rung, -room.free, room.executor)
        if rung < mine and (best is None or key < best):
            best, chosen = key, room
    return chosen


class Steering:
    """One executor's side of placement: the GPU jobs it left to a roomier device."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self._left: dict[str, float] = {}
        """GPU jobs left to a roomier device, and when (monotonic) this executor first did:
        the bound counts from then, not from submission (a train job that waited for its
        cache job is as new to placement as a fresh one)."""

    async def roomier_executor(self, job: JobView, stage: StageDef) -> str | None:
        """Another live executor whose device would start this GPU job on a higher rung
        than this one's, until this executor has left it for ``lease_seconds``
        (``daemon/placement.py``); None: claim it here. Never raises: a claim is not
        held up by a failed look."""
        ex = self.executor
        waited = time.monotonic() - self._left.get(job.id, time.monotonic())
        if waited >= ex.lease_s:
            del self._left[job.id]  # taken now; a requeue later is judged afresh
            return None
        if (
            Lane(stage.lane) != Lane.GPU
            or stage.start_rung is None
            or not ex.device.startswith("cuda")
        ):
            return None
        try:
            fresh_s = FRESH_SAMPLES * max(ex.settings.telemetry_every_s, IDLE_TELEMETRY_S)
            now = time.time()
            rooms = [
                DeviceRoom(s.executor, s.device_class, s.device, s.free, now - s.at)
                for s in await device_rooms(ex.store, fresh_s)
                if s.executor is not None and s.executor != ex.id
            ]
            if not rooms:
                return None
            remembered = await remembered_rung(ex.store, job.rung_key) if job.rung_key else 0
            floor = max(job.memory_rung, remembered)
            frees = [room.free for room in rooms if room.free is not None]
            rungs = await ex.device_thread.run(
                estimate_rungs, stage, job, str(ex.settings.root), ex.device, frees
            )
        except Exception:
            log.warning("could not compare devices for job %s", job.id, exc_info=True)
            return None
        if rungs is None:
            return None
        mine, theirs = rungs
        chosen = roomier(
            max(mine, floor),
            rooms,
            lambda free: max(theirs[free], floor),
            job.device_class,
            fresh_s,
            waited,
            ex.lease_s,
        )
        if chosen is None:
            self._left.pop(job.id, None)
            return None
        if job.id not in self._left:
            self._left[job.id] = time.monotonic()
            log.info(
                "leaving %s job %s to %s, whose device has room for a higher rung (for %g s "
                "at most)",
                job.stage,
                job.id,
                chosen.executor,
                ex.lease_s,
            )
        return chosen.executor


def estimate_start_rung(stage: StageDef, job: JobView, root: str, device: str) -> int | None:
    """The stage's starting-rung estimate from this device's free memory (on the device
    thread)."""
    from dropkiln.stages.models import shared_pipelines

    assert stage.start_rung is not None
    free = int(memory_snapshot(device)["free"])
    # Warm pipelines of dropkiln's own are reused by the job or evicted for it.
    facts = StartFacts(root, job.rung_key, free + shared_pipelines().device_bytes(device))
    return stage.start_rung(stage.spec.model_validate(job.spec), facts)


def estimate_rungs(
    stage: StageDef, job: JobView, root: str, device: str, frees: list[int]
) -> tuple[int, dict[int, int]] | None:
    """The estimated starting rung here, and with each of ``frees`` bytes available; None
    when the stage cannot estimate this job."""
    mine = estimate_start_rung(stage, job, root, device)
    if mine is None:
        return None
    assert stage.start_rung is not None
    spec = stage.spec.model_validate(job.spec)
    theirs: dict[int, int] = {}
    for free in frees:
        rung = stage.start_rung(spec, StartFacts(root, job.rung_key, free))
        theirs[free] = len(stage.ladder) - 1 if rung is None else rung
    return mine, theirs
