"""The cached dataset in memory, the order it is seen in, and one step's batches.

Data order is a pure function of (seed, position): an epoch is a seeded permutation of
bucket batches, so resuming needs only the position, and it is the same on every rung.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

from dropkiln.options import TrainSettings
from dropkiln.stages.base import StageError
from dropkiln.stages.bucket_manifest import UNCAPPED_FILE_BYTES, bucket_pixels
from dropkiln.stages.cache import CacheIndex, IndexedImage, ShardRef
from dropkiln.stages.models.encoding import (
    encode_captions,
    encode_latents,
    pixels_to_tensor,
    vae_for_encoding,
)
from dropkiln.stages.shards import CorruptShard, FetchedShard, ShardStore, tensors
from dropkiln.stages.training.captions import augment_caption, tag_loss_weight
from dropkiln.stages.training.losses import NoiseDraw, draw_noise
from dropkiln.stages.training.pipeline import TrainingPipeline

Size = tuple[int, int]


@dataclass
class CachedImage:
    caption: str
    bucket: Size
    planned: IndexedImage
    """Its entry in the cache index: the latents' shard and the size conditioning."""
    has_flipped: bool
    weight: float


@dataclass
class CachedDataset:
    """The dataset as training sees it: the cache index's entries, with the tensors read
    from their shards when a batch needs them.

    Nothing of the dataset stays on the device between batches: latents and text-encoder
    outputs stream from the memory-mapped safetensors shards (the OS page cache keeps the
    hot ones), so device memory does not grow with the number of images. Every shard was
    verified when the dataset was loaded; a read still checks its hash, and a shard damaged
    since is re-encoded again rather than trained on.
    """

    name: str
    kind: str
    images: list[CachedImage]
    text: dict[str, ShardRef]
    """The cached text-encoder outputs' shard by caption (the exact captions and the empty one)."""
    shards: ShardStore
    device: str
    repair: Callable[[str, ShardRef], dict[str, torch.Tensor]]
    """Re-encode a damaged shard (kind "latents" or "text"; the ShardRef names it)."""
    repaired: int = 0
    prefetched: dict[ShardRef, FetchedShard] = field(default_factory=dict)
    """Shards already read for the batch being assembled (prefetch.py), by reference."""

    def shards_of(self, indices: list[int], with_text: bool) -> list[ShardRef]:
        """The shards a batch of these images reads: latents, and the captions' text outputs
        (the empty caption's too, which caption dropout may pick)."""
        refs = [self.images[index].planned.latents for index in indices]
        if with_text:
            refs += [self.text[self.images[index].caption] for index in indices]
            refs.append(self.text[""])
        return refs

    def buckets(self) -> dict[Size, list[int]]:
        groups: dict[Size, list[int]] = {}
        for index, image in enumerate(self.images):
            groups.setdefault(image.bucket, []).append(index)
        return groups

    def resolution(self) -> Size:
        """The most common bucket (for metadata and validation images)."""
        groups = self.buckets()
        return max(groups, key=lambda size: (len(groups[size]), size))

    def latents(self, image: CachedImage, flipped: bool) -> torch.Tensor:
        """The image's latents (or its mirror's) on the device."""
        tensors = self._read("latents", image.planned.latents)
        return tensors["latents_flipped" if flipped else "latents"].to(self.device)

    def time_ids(self, image: CachedImage, flipped: bool) -> torch.Tensor:
        planned = image.planned
        crop = planned.flipped_crop_top_left if flipped else planned.crop_top_left
        return _time_ids(planned, crop, self.device)

    def text_outputs(self, caption: str) -> dict[str, torch.Tensor]:
        """The cached text-encoder outputs of an exact caption (or the empty one)."""
        return {k: v.to(self.device) for k, v in self._read("text", self.text[caption]).items()}

    def _read(self, kind: str, ref: ShardRef) -> dict[str, torch.Tensor]:
        fetched = self.prefetched.get(ref)
        try:
            if fetched is not None:
                return tensors(fetched)
            return self.shards.read(ref.shard, ref.key)
        except CorruptShard:
            self.repaired += 1
            return self.repair(kind, ref)


def load_cached_dataset(
    index: CacheIndex, pipe: TrainingPipeline, device: str, tag_weights: dict[str, float]
) -> CachedDataset:
    """Every shard the index names, verified (a damaged one is re-encoded), not kept."""
    store = ShardStore(Path(index.cache_dir))
    by_ref = {image.latents: image for image in index.images}
    captions = {image.text: image.caption for image in index.images} | {index.empty_text: ""}

    def repair(kind: str, ref: ShardRef) -> dict[str, torch.Tensor]:
        if kind == "text":
            return _reencode_text(pipe, store, captions[ref], ref)
        return _reencode_latents(pipe, store, index, by_ref[ref])

    text = {"": index.empty_text} | {image.caption: image.text for image in index.images}
    dataset = CachedDataset(index.name, index.model.kind, [], text, store, device, repair)
    for ref in dict.fromkeys(text.values()):
        dataset._read("text", ref)
    for image in index.images:
        tensors = dataset._read("latents", image.latents)
        if index.flip_augment and "latents_flipped" not in tensors:
            raise StageError(f"cached latents of {image.path} lack the flipped variant")
        dataset.images.append(
            CachedImage(
                caption=image.caption,
                bucket=image.bucket,
                planned=image,
                has_flipped="latents_flipped" in tensors,
                weight=tag_loss_weight(image.caption, tag_weights),
            )
        )
    return dataset


def _time_ids(image: IndexedImage, crop_top_left: tuple[int, int], device: str) -> torch.Tensor:
    """SDXL size conditioning: original (h, w), crop (top, left), target (h, w)."""
    (orig_w, orig_h), (bucket_w, bucket_h) = image.original_size, image.bucket
    values = [orig_h, orig_w, crop_top_left[0], crop_top_left[1], bucket_h, bucket_w]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _reencode_text(
    pipe: TrainingPipeline, store: ShardStore, caption: str, entry: ShardRef
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        encoded = encode_captions(pipe, [caption])
    tensors = {k: v[0].detach().cpu() for k, v in encoded.items()}
    store.write("text", entry.key, tensors)
    return tensors


def _reencode_latents(
    pipe: TrainingPipeline, store: ShardStore, index: CacheIndex, image: IndexedImage
) -> dict[str, torch.Tensor]:
    picture = bucket_pixels(Path(index.dataset_dir), image, UNCAPPED_FILE_BYTES)
    with vae_for_encoding(pipe, tiled=False) as vae:
        tensors = {"latents": encode_latents(vae, pixels_to_tensor([picture]))[0].cpu()}
        if index.flip_augment:
            mirrored = pixels_to_tensor([ImageOps.mirror(picture)])
            tensors["latents_flipped"] = encode_latents(vae, mirrored)[0].cpu()
    store.write("latents", image.latents.key, tensors)
    return tensors


class DataOrder:
    """Which images form the batch at each position: shuffled bucket batches per epoch."""

    def __init__(self, buckets: dict[Size, list[int]], batch_size: int, seed: int) -> None:
        self._buckets = {size: list(indices) for size, indices in sorted(buckets.items())}
        self._batch_size = batch_size
        self._seed = seed
        self.batches_per_epoch = sum(
            -(-len(indices) // batch_size) for indices in self._buckets.values()
        )

    def batch(self, position: int) -> list[int]:
        epoch, offset = divmod(position, self.batches_per_epoch)
        return list(self._epoch(epoch)[offset])

    @lru_cache(maxsize=2)  # noqa: B019 - one order object per training run
    def _epoch(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        rng = np.random.Generator(np.random.PCG64([self._seed, epoch]))
        batches: list[tuple[int, ...]] = []
        for indices in self._buckets.values():
            order = [indices[i] for i in rng.permutation(len(indices))]
            for start in range(0, len(order), self._batch_size):
                batches.append(tuple(order[start : start + self._batch_size]))
        return tuple(batches[i] for i in rng.permutation(len(batches)))


@dataclass
class Batch:
    """One bucket batch with its randomness drawn, ready to be cut into micro-batches."""

    latents: torch.Tensor
    time_ids: torch.Tensor
    captions: list[str]
    cached_text: dict[str, torch.Tensor] | None
    weights: torch.Tensor
    draw: NoiseDraw

    def __len__(self) -> int:
        return len(self.captions)

    def rows(self, start: int, stop: int) -> Batch:
        text = None
        if self.cached_text is not None:
            text = {k: v[start:stop] for k, v in self.cached_text.items()}
        draw = NoiseDraw(
            self.draw.noise[start:stop],
            self.draw.timesteps[start:stop],
            None if self.draw.perturbation is None else self.draw.perturbation[start:stop],
        )
        return Batch(
            self.latents[start:stop],
            self.time_ids[start:stop],
            self.captions[start:stop],
            text,
            self.weights[start:stop],
            draw,
        )


def assemble_batch(
    dataset: CachedDataset,
    indices: list[int],
    rng: np.random.Generator,
    generator: torch.Generator,
    options: TrainSettings,
    num_train_timesteps: int,
    encode_on_the_fly: bool,
) -> Batch:
    """Flip choice and caption per image (numpy ``rng``), then the batch's noise draw."""
    latents, time_ids, captions, weights = [], [], [], []
    for index in indices:
        image = dataset.images[index]
        flip = image.has_flipped and bool(rng.random() < 0.5)
        latents.append(dataset.latents(image, flip))
        time_ids.append(dataset.time_ids(image, flip))
        captions.append(augment_caption(image.caption, rng, options))
        weights.append(image.weight)
    stacked = torch.stack(latents).float()
    cached_text = None
    if not encode_on_the_fly:
        parts = [dataset.text_outputs(caption) for caption in captions]
        cached_text = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}
    device = stacked.device
    draw = draw_noise(stacked, generator, options, num_train_timesteps)
    draw = NoiseDraw(
        draw.noise.to(device),
        draw.timesteps.to(device),
        None if draw.perturbation is None else draw.perturbation.to(device),
    )
    return Batch(
        stacked,
        torch.stack(time_ids),
        captions,
        cached_text,
        torch.tensor(weights, dtype=torch.float32, device=device),
        draw,
    )
