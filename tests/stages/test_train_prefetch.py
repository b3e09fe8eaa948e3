"""Bounded prefetch of the cache shards: memory held does not grow with the dataset, the
batches are the ones read directly, and the prefetch thread runs no torch code."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from test_train_memory import _cache, _held_bytes

from dropkiln.options import TrainSettings
from dropkiln.stages.training.data import CachedDataset, DataOrder, assemble_batch
from dropkiln.stages.training.prefetch import ShardPrefetch

DEPTH = 2
BATCH = 2


def _prefetch(dataset: CachedDataset, order: DataOrder, first: int = 0) -> ShardPrefetch:
    return ShardPrefetch(
        dataset.shards,
        lambda position: dataset.shards_of(order.batch(position), True),
        first,
        depth=DEPTH,
    )


def _batches(dataset: CachedDataset, order: DataOrder, positions: range, prefetch: Any) -> list:
    """The batches at ``positions``, drawn from one seed, with or without the prefetch."""
    rng = np.random.Generator(np.random.PCG64(3))
    generator = torch.Generator().manual_seed(3)
    options = TrainSettings(flip_augment=True, caption_dropout=0.3)
    out = []
    for position in positions:
        if prefetch is not None:
            dataset.prefetched = prefetch.take(position)
        out.append(
            assemble_batch(dataset, order.batch(position), rng, generator, options, 1000, False)
        )
        dataset.prefetched = {}
    return out


def _wait_full(prefetch: ShardPrefetch) -> None:
    deadline = time.monotonic() + 30
    while prefetch.peak_held_batches < DEPTH + 1 and time.monotonic() < deadline:
        time.sleep(0.01)


def test_prefetch_holds_a_few_batches_whatever_the_dataset_size(dropkiln_root: Path) -> None:
    peaks = {}
    for name, count in (("small", 4), ("large", 16)):
        _, dataset = _held_bytes(_cache(dropkiln_root, name, count), dropkiln_root)
        order = DataOrder(dataset.buckets(), BATCH, seed=1)
        positions = range(3 * order.batches_per_epoch)  # three epochs, read slowly
        largest_batch = max(
            sum(dataset.shards.fetch(r.shard, r.key).nbytes
                for r in dict.fromkeys(dataset.shards_of(order.batch(p), True)))
            for p in positions
        )  # fmt: skip
        with _prefetch(dataset, order) as prefetch:
            _wait_full(prefetch)  # the consumer is slow: the queue fills up
            taken = [prefetch.take(position) for position in positions]
            assert all(taken), "every batch came from the prefetch"
            assert prefetch.peak_held_batches <= DEPTH + 1
            assert prefetch.peak_held_bytes <= (DEPTH + 1) * largest_batch
            peaks[name] = prefetch.peak_held_batches
        assert sum(shard.nbytes for batch in taken for shard in batch.values()) > (
            prefetch.peak_held_bytes
        ), "the whole run read more than was ever held at once"
    # Four times the images: the same batches held, not four times as many.
    assert peaks["large"] == peaks["small"] == DEPTH + 1


def test_prefetched_batches_are_the_ones_read_directly(dropkiln_root: Path) -> None:
    _, dataset = _held_bytes(_cache(dropkiln_root, "cats", 6), dropkiln_root)
    order = DataOrder(dataset.buckets(), BATCH, seed=1)
    positions = range(2, 2 + 2 * order.batches_per_epoch)  # a resumed run starts part-way
    direct = _batches(dataset, order, positions, None)
    with _prefetch(dataset, order, first=positions[0]) as prefetch:
        fetched = _batches(dataset, order, positions, prefetch)
    for one, other in zip(direct, fetched, strict=True):
        assert one.captions == other.captions
        assert one.latents.equal(other.latents)
        assert one.draw.noise.equal(other.draw.noise)
        assert one.cached_text is not None and other.cached_text is not None
        for key in one.cached_text:
            assert one.cached_text[key].equal(other.cached_text[key])


def test_a_position_behind_the_prefetch_is_read_directly(dropkiln_root: Path) -> None:
    _, dataset = _held_bytes(_cache(dropkiln_root, "cats", 4), dropkiln_root)
    order = DataOrder(dataset.buckets(), BATCH, seed=1)
    with _prefetch(dataset, order, first=1) as prefetch:
        assert prefetch.take(0) == {}
        assert prefetch.take(2)  # position 1 is skipped, 2 is served
        assert prefetch.take(1) == {}


def test_the_prefetch_thread_runs_no_torch_code(dropkiln_root: Path) -> None:
    _, dataset = _held_bytes(_cache(dropkiln_root, "cats", 4), dropkiln_root)
    order = DataOrder(dataset.buckets(), BATCH, seed=1)
    modules: set[str] = set()

    def watch(frame: FrameType, event: str, arg: Any) -> None:
        if threading.current_thread().name != "shard-prefetch":
            return
        if event == "call":
            modules.add(str(frame.f_globals.get("__name__", "")))
        elif event == "c_call":
            modules.add(str(getattr(arg, "__module__", None) or ""))

    threading.setprofile(watch)
    try:
        with _prefetch(dataset, order) as prefetch:
            _wait_full(prefetch)
            for position in range(order.batches_per_epoch):
                assert prefetch.take(position)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        sys.setprofile(None)
    assert "dropkiln.stages.shards" in modules, "the watch saw the thread's reads"
    touched = {m for m in modules if m.split(".")[0] in {"torch", "safetensors"}}
    assert not touched, touched


def test_closing_a_full_prefetch_does_not_hang(dropkiln_root: Path) -> None:
    _, dataset = _held_bytes(_cache(dropkiln_root, "cats", 4), dropkiln_root)
    order = DataOrder(dataset.buckets(), BATCH, seed=1)
    prefetch = _prefetch(dataset, order)
    with prefetch:
        _wait_full(prefetch)  # the thread now waits on a full queue
    assert prefetch.take(5) == {}, "a closed prefetch serves nothing"
