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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
