"""An executor on a small card leaves a training job to a live executor whose card has
room for a higher rung, for a bounded time. Device facts are faked (the memory probe and the
model are monkeypatched; the other card is a telemetry sample), the store is real."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import anyio

from dropkiln.config import Settings
from dropkiln.daemon.executor import Executor
from dropkiln.stages.faults import FaultInjector
from dropkiln.store import EventStore, find_job, record_telemetry
from tests.daemon import test_starting_rung as facts
from tests.daemon.test_starting_rung import FREE_12GB, FREE_24GB, FakeDeviceThread, submit

# The faked device (its free memory, an SDXL model) and the real store of the rung tests.
free_memory = facts.free_memory
store = facts.store

OTHER = "box-b/cuda:0"


def small_card(tmp_path: Path, store: EventStore, lease_s: float = 30.0) -> Executor:
    executor = {"lease_seconds": lease_s, "heartbeat_seconds": lease_s / 2}
    settings = Settings(root=tmp_path, executor=executor)
    thread = cast(Any, FakeDeviceThread("cuda:0"))
    return Executor(settings, store, thread, FaultInjector(), "box-a/cuda:0")


async def other_card(store: EventStore, free: int, age_s: float = 0.5, **extra: Any) -> None:
    sample = {"executor": OTHER, "device": "cuda:0", "free": free, "at": time.time() - age_s}
    await record_telemetry(store, sample | extra, retention_s=600)


async def test_a_job_is_left_to_a_live_roomier_card(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = small_card(tmp_path, store)
    free_memory(FREE_12GB)
    await submit(store, "train")
    job = await find_job(store, "train")
    assert await ex.roomier_executor(job) is None  # nobody else
    await other_card(store, FREE_24GB, age_s=60)
    assert await ex.roomier_executor(job) is None  # its daemon is gone
    await other_card(store, FREE_12GB)
    assert await ex.roomier_executor(job) is None  # no more room there
    await other_card(store, FREE_24GB)
    assert await ex.roomier_executor(job) == OTHER
    free_memory(FREE_24GB)
    assert await ex.roomier_executor(job) is None  # room enough here too


async def test_a_pinned_job_is_left_only_to_a_card_of_its_class(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = small_card(tmp_path, store)
    free_memory(FREE_12GB)
    await submit(store, "train")
    job = await find_job(store, "train")
    await other_card(store, FREE_24GB, device_class="a100")
    pinned = dataclasses.replace(job, device_class="cuda")
    assert await ex.roomier_executor(pinned) is None
    assert await ex.roomier_executor(job) == OTHER


async def test_after_its_bound_the_job_is_taken_anyway(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = small_card(tmp_path, store, lease_s=0.4)
    free_memory(FREE_12GB)
    await submit(store, "train")
    job = await find_job(store, "train")
    # Queued longer than the bound (as a train job waits for its cache job): the bound
    # counts from when the job was first left, so it is still worth leaving now.
    await anyio.sleep(0.5)
    await other_card(store, FREE_24GB)
    assert await ex.roomier_executor(job) == OTHER
    await anyio.sleep(0.5)
    await other_card(store, FREE_24GB)
    assert await ex.roomier_executor(job) is None
