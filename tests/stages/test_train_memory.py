"""Device memory of training's data: the dataset streams from its shards, so its size does
not cost device memory.

On the CPU the device's memory is the process's, so the accounting is what torch's CUDA
allocator counts on a GPU: the bytes of the tensors alive on the device (``live_bytes``
walks them). The GPU form of the same check is ``test_gpu.py``.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_fixtures import make_dataset, mixed_images

from dropkiln.options import TrainSettings
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import STAGE as CACHE
from dropkiln.stages.cache import CacheIndex, CacheResult, CacheSpec
from dropkiln.stages.models import resolve_model, shared_pipelines
from dropkiln.stages.shards import ShardStore
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.training.data import CachedDataset, assemble_batch, load_cached_dataset


def live_bytes(device: str) -> int:
    """Bytes of every tensor alive on ``device`` (storages counted once)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): some module-level proxies warn when asked their __class__
        if issubclass(type(obj), torch.Tensor) and obj.device == torch.device(device):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _cache(root: Path, name: str, count: int) -> CacheIndex:
    manifest = make_dataset(root, name, mixed_images(count))
    ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / f"cache-{name}",
        upstream_results={"bucket": BucketResult.of(manifest)},
    )
    result = CACHE.run(CacheSpec(name=name, flip_augment=True), ctx)
    assert isinstance(result, CacheResult)
    return CacheIndex.load(result.index)


def _held_bytes(index: CacheIndex, root: Path) -> tuple[int, CachedDataset]:
    ref = resolve_model("tiny-sdxl", root / "state" / "models")
    pipe = shared_pipelines().get(ref, "cpu", torch.float32)
    before = live_bytes("cpu")
    dataset = load_cached_dataset(index, pipe, "cpu", {})
    return live_bytes("cpu") - before, dataset


def test_dataset_size_does_not_cost_device_memory(dropkiln_root: Path) -> None:
    small = _cache(dropkiln_root, "small", 2)
    large = _cache(dropkiln_root, "large", 10)
    one_image = sum(
        t.untyped_storage().nbytes()
        for t in ShardStore(Path(large.cache_dir))
        .read(large.images[0].latents.shard, large.images[0].latents.key)
        .values()
    )
    held_small, _ = _held_bytes(small, dropkiln_root)
    held_large, dataset = _held_bytes(large, dropkiln_root)
    # Eight more images would hold eight more latents (and their mirrors) if they stayed on
    # the device; streamed, the loaded dataset holds none.
    assert held_large - held_small < one_image, (held_small, held_large, one_image)
    assert held_large < one_image

    # What a batch reads is exactly what the shards hold.
    options = TrainSettings(flip_augment=True)
    rng = np.random.Generator(np.random.PCG64(0))
    batch = assemble_batch(dataset, [0, 2], rng, torch.Generator().manual_seed(0), options,
                           1000, False)  # fmt: skip
    store = ShardStore(Path(large.cache_dir))
    for row, index in enumerate([0, 2]):
        shard = store.read(large.images[index].latents.shard, large.images[index].latents.key)
        assert any(batch.latents[row].equal(shard[k].float()) for k in shard)


@pytest.mark.parametrize("damage", ["latents", "text"])
def test_a_shard_damaged_during_training_is_re_encoded_not_trained_on(
    dropkiln_root: Path, damage: str
) -> None:
    index = _cache(dropkiln_root, "cats", 2)
    _, dataset = _held_bytes(index, dropkiln_root)
    image = dataset.images[0]
    expected = dataset.latents(image, False) if damage == "latents" else None
    ref = index.images[0].latents if damage == "latents" else index.images[0].text
    path = Path(index.cache_dir) / ref.shard
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor's bytes
    path.write_bytes(bytes(data))
    if damage == "latents":
        assert dataset.latents(image, False).equal(expected)
    else:
        assert set(dataset.text_outputs(image.caption)) >= {"prompt_embeds"}
    assert dataset.repaired == 1
    assert ShardStore(Path(index.cache_dir)).is_intact(damage, ref.key)
