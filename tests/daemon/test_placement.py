"""Steering a GPU job to the device with room for it (``daemon/placement.py``), with the
facts faked: each case is a device's rung from its free memory, how fresh its sample is,
its class, and how long the job has waited."""

from __future__ import annotations

import pytest

from dropkiln.daemon.placement import DeviceRoom, roomier

GIB = 1024**3
FRESH_S = 7.5
BOUND_S = 30.0


def rung_on(free: int) -> int:
    """A made-up ladder: 20 GiB free starts on rung 0, 14 on rung 1, 8 on rung 2, less on 3."""
    return next((rung for rung, need in enumerate((20, 14, 8)) if free >= need * GIB), 3)


def room(
    name: str,
    free_gib: float | None,
    age_s: float = 1.0,
    device_class: str | None = "cuda",
    device: str = "cuda:1",
) -> DeviceRoom:
    free = None if free_gib is None else int(free_gib * GIB)
    return DeviceRoom(f"box/{name}", device_class, device, free, age_s)


@pytest.mark.parametrize(
    ("mine", "rooms", "pinned", "waited_s", "expected"),
    [
        # A roomier live device: leave it there.
        (2, [room("big", 22)], None, 0.0, "box/big"),
        # The same rung there as here: no reason to wait.
        (2, [room("same", 9)], None, 0.0, None),
        # Already on the top rung here: nothing to gain.
        (0, [room("big", 22)], None, 0.0, None),
        # Less room there than here.
        (1, [room("small", 9)], None, 0.0, None),
        # Its newest sample is stale: that daemon is gone or hung.
        (2, [room("big", 22, age_s=FRESH_S)], None, 0.0, None),
        (2, [room("big", 22, age_s=FRESH_S - 0.1)], None, 0.0, "box/big"),
        # Waited its bound: taken here anyway, stepping down rungs as usual.
        (2, [room("big", 22)], None, BOUND_S, None),
        (2, [room("big", 22)], None, BOUND_S - 0.1, "box/big"),
        # Pinned to a class the roomy device is not of.
        (2, [room("big", 22, device_class="a100")], "24gb", 0.0, None),
        (2, [room("big", 22, device_class="24gb")], "24gb", 0.0, "box/big"),
        # A CPU executor's "free memory" is RAM, not a GPU's room.
        (2, [room("cpu", 60, device="cpu")], None, 0.0, None),
        # No sample of its memory.
        (2, [room("blind", None)], None, 0.0, None),
        # Several: the highest rung wins, then the most free memory.
        (3, [room("mid", 15), room("big", 21), room("bigger", 23)], None, 0.0, "box/bigger"),
        (3, [room("mid", 15), room("stale", 40, age_s=60)], None, 0.0, "box/mid"),
        # Nobody else.
        (2, [], None, 0.0, None),
    ],
)
def test_a_gpu_job_is_left_to_a_live_device_with_more_room_for_a_while(
    mine: int, rooms: list[DeviceRoom], pinned: str | None, waited_s: float, expected: str | None
) -> None:
    chosen = roomier(mine, rooms, rung_on, pinned, FRESH_S, waited_s, BOUND_S)
    assert (chosen.executor if chosen else None) == expected


def test_the_remembered_rung_is_a_floor_on_every_device() -> None:
    """A job that needs rung 2 on any card (it ran out of memory above it) gains nothing
    from a roomier card: the caller raises every device's rung to that floor."""
    floor = 2
    chosen = roomier(
        max(2, floor), [room("big", 22)], lambda free: max(rung_on(free), floor), None,
        FRESH_S, 0.0, BOUND_S,
    )  # fmt: skip
    assert chosen is None
