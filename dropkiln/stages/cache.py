"""The cache stage: VAE latents and text-encoder outputs for a bucketed dataset.

Every latent and caption embedding is a content-addressed shard under ROOT/state/cache:
its key covers the image bytes, resize, crop, bucket, flip augmentation, model fingerprint
and dtype (latents) or the caption text, model and dtype (text). Re-dropping a dataset
with one image changed encodes only that image; a corrupt shard is re-encoded.

Caption augmentation: the exact caption and the empty caption (for caption dropout) are
cached. Tag shuffling and tag dropout make captions that cannot all be cached, so the
train stage encodes those on the fly with the frozen text encoders, which the warm
pipeline holds anyway.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dropkiln.stages.base import (
    MemoryRung,
    StageContext,
    StageDef,
    StageError,
    StageResult,
    StageSpec,
    StageStopped,
    validation_reason,
    write_atomic,
)
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.bucket_manifest import BucketManifest, ManifestImage
from dropkiln.stages.imaging import Size
from dropkiln.stages.shards import CorruptShard, ShardStore, shard_key

if TYPE_CHECKING:
    import torch

    from dropkiln.stages.models import ModelRef

INDEX_NAME = "cache-index.json"
INDEX_FORMAT: Final = "dropkiln.latent-cache"
INDEX_VERSION: Final = 1
TEXT_BATCH = 16


class CacheSpec(StageSpec):
    name: str
    model: str = "tiny-sdxl"
    vae: str = ""
    """A standalone VAE file in place of the model's own ("": none)."""
    flip_augment: bool = False
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights and shard dtype; auto is fp32 on the CPU, bf16 (else fp16) on CUDA."""
    vae_batch_size: int = 1
    """VAE batch at the top rung; each rung down halves it.

    1 by default so that a shard's bytes are a pure function of its key: convolution
    kernels pick different algorithms by batch size (the tiny VAE on the CPU differs by
    up to 1.1e-6 between an image encoded alone and in a batch of 4), so with batches a
    retried or resumed cache, which re-encodes only the missing images, would train a
    slightly different LoRA than an undisturbed run. Larger batches are faster on small
    images and give up that exactness."""


class ShardRef(BaseModel):
    """One shard of the cache: its key and its path relative to the index's ``cache_dir``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    shard: str


class IndexedModel(BaseModel):
    """The model the shards were encoded with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str
    fingerprint: str


class IndexedImage(BaseModel):
    """One image of the cache index: its bucket plan (from the manifest) and its shards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    caption: str
    bucket: Size
    original_size: Size
    resized_size: Size
    crop_box: tuple[int, int, int, int]
    crop_top_left: tuple[int, int]
    flipped_crop_top_left: tuple[int, int]
    latents: ShardRef
    text: ShardRef
    """The shard of the exact caption's text-encoder outputs."""


class CacheIndex(BaseModel):
    """The cache stage's output, read by the train stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dropkiln.latent-cache"] = INDEX_FORMAT
    version: Literal[1] = INDEX_VERSION
    name: str
    model: IndexedModel
    dtype: str
    flip_augment: bool
    cache_dir: str
    dataset_dir: str
    empty_text: ShardRef
    """The shard of the empty caption (caption dropout)."""
    images: list[IndexedImage]

    @classmethod
    def load(cls, path: Path | str) -> CacheIndex:
        """Read an index written by the cache stage; StageError says why one cannot be."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise StageError(f"latent cache index {path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise StageError(f"{path} is not a latent cache index")
        if data.get("version") != INDEX_VERSION:
            raise StageError(
                f"latent cache index {path} is format version {data.get('version')}, which "
                f"this dropkiln does not read (it reads {INDEX_VERSION}); drop the dataset again"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise StageError(
                f"latent cache index {path} is damaged: {validation_reason(exc)}"
            ) from exc

    def write(self, path: Path) -> Path:
        """The index as JSON with one image a line. json's indenting encoder is pure Python:
        indenting every image took 20 ms of a 33 ms re-cache of 200 images with one changed
        (``python -m dropkiln.bench.cache``); each line here goes through its C encoder."""
        data = self.model_dump(mode="json")
        images = ",\n  ".join(json.dumps(image) for image in data.pop("images"))
        head = json.dumps(data, indent=1).removesuffix("\n}")
        return write_atomic(path, f'{head},\n "images": [\n  {images}\n ]\n}}\n')


class CacheResult(StageResult):
    """What the cache stage hands on: where its index is, and what it had to encode."""

    index: str
    """The index's path (CacheIndex)."""
    images: int
    encoded: int
    reused: int
    captions_encoded: int


def run_cache(spec: CacheSpec, ctx: StageContext) -> CacheResult:
    """Encode what is not cached yet; write the index the train stage reads."""
    from dropkiln.stages.models import resolve_model, shared_pipelines
    from dropkiln.stages.models.encoding import compute_dtype

    rung = STAGE.rung(ctx.memory_rung).options
    vae_batch = max(1, spec.vae_batch_size // int(rung.get("vae_batch_divisor", 1)))
    manifest = BucketManifest.load(BucketResult.upstream(ctx, "bucket").manifest)
    if not manifest.images:
        raise StageError(f"dataset {manifest.name} has no usable images to cache")
    ref = resolve_model(spec.model, ctx.root / "state" / "models", vae=spec.vae)
    dtype = compute_dtype(ctx.device, spec.dtype)
    store = ShardStore(ctx.root / "state" / "cache")
    dtype_name = str(dtype).removeprefix("torch.")

    latent_keys = [
        shard_key(
            "latents",
            image=image.sha256,
            resized=image.resized_size,
            crop=image.crop_box,
            bucket=image.bucket,
            flip=spec.flip_augment,
            model=ref.fingerprint,
            dtype=dtype_name,
        )
        for image in manifest.images
    ]
    captions = sorted({image.caption for image in manifest.images} | {""})
    text_keys = {
        c: shard_key("text", caption=c, model=ref.fingerprint, dtype=dtype_name) for c in captions
    }
    todo_images = [
        (image, key)
        for image, key in zip(manifest.images, latent_keys, strict=True)
        if not store.is_intact("latents", key)
    ]
    todo_captions = [c for c in captions if not store.is_intact("text", text_keys[c])]
    total = len(todo_images) + len(todo_captions)
    ctx.progress(0, total)
    if total:
        pipe = shared_pipelines().get(ref, ctx.device, dtype)
        done = _encode_images(pipe, manifest, todo_images, vae_batch, rung, store, spec, ctx, total)
        _encode_texts(pipe, todo_captions, text_keys, store, ctx, done, total)
    index = _index(spec, ref, dtype_name, manifest, store, latent_keys, text_keys)
    path = index.write(ctx.work_dir / INDEX_NAME)
    ctx.artifact(path, "cache-index")
    return CacheResult(
        index=str(path),
        images=len(manifest.images),
        encoded=len(todo_images),
        reused=len(manifest.images) - len(todo_images),
        captions_encoded=len(todo_captions),
    )


def _encode_images(
    pipe: Any,
    manifest: BucketManifest,
    todo: list[tuple[ManifestImage, str]],
    vae_batch: int,
    rung: dict[str, Any],
    store: ShardStore,
    spec: CacheSpec,
    ctx: StageContext,
    total: int,
) -> int:
    from PIL import ImageOps

    from dropkiln.stages.models.encoding import encode_latents, pixels_to_tensor, vae_for_encoding

    by_bucket: dict[Size, list[tuple[ManifestImage, str]]] = defaultdict(list)
    for item in todo:
        by_bucket[item[0].bucket].append(item)
    done = 0
    from dropkiln.stages.fault_hooks import inside, middle_block

    def in_encode() -> None:
        ctx.fault("cache.encode")

    with (
        vae_for_encoding(pipe, tiled=bool(rung.get("vae_tiling"))) as vae,
        inside(middle_block(vae.encoder), in_encode),
    ):
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            for start in range(0, len(items), vae_batch):
                _stop_point(ctx, done)
                ctx.fault("cache.batch")
                batch = items[start : start + vae_batch]
                pictures = [manifest.bucket_pixels(image) for image, _ in batch]
                latents = encode_latents(vae, pixels_to_tensor(pictures))
                flipped = None
                if spec.flip_augment:
                    mirrored = [ImageOps.mirror(p) for p in pictures]
                    flipped = encode_latents(vae, pixels_to_tensor(mirrored))
                for row, (_, key) in enumerate(batch):
                    tensors = {"latents": latents[row]}
                    if flipped is not None:
                        tensors["latents_flipped"] = flipped[row]
                    store.write("latents", key, tensors)
                done += len(batch)
                ctx.progress(done, total)
    return done


def _encode_texts(
    pipe: Any,
    captions: list[str],
    keys: dict[str, str],
    store: ShardStore,
    ctx: StageContext,
    done: int,
    total: int,
) -> None:
    import torch

    from dropkiln.stages.models.encoding import encode_captions

    for start in range(0, len(captions), TEXT_BATCH):
        _stop_point(ctx, done)
        ctx.fault("cache.batch")
        batch = captions[start : start + TEXT_BATCH]
        with torch.no_grad():
            encoded = encode_captions(pipe, batch)
        for row, caption in enumerate(batch):
            store.write("text", keys[caption], {k: v[row] for k, v in encoded.items()})
        done += len(batch)
        ctx.progress(done, total)


def _stop_point(ctx: StageContext, done: int) -> None:
    # Shards already written are the checkpoint: a resumed run finds them and skips them.
    if ctx.should_stop():
        ctx.checkpoint({"encoded": done})
        raise StageStopped(f"cache stopped after {done} new shards")


def _index(
    spec: CacheSpec,
    ref: ModelRef,
    dtype_name: str,
    manifest: BucketManifest,
    store: ShardStore,
    latent_keys: list[str],
    text_keys: dict[str, str],
) -> CacheIndex:
    def shard(kind: str, key: str) -> ShardRef:
        return ShardRef(key=key, shard=store.relative(kind, key))

    images = [
        IndexedImage(
            path=image.path,
            sha256=image.sha256,
            caption=image.caption,
            bucket=image.bucket,
            original_size=image.original_size,
            resized_size=image.resized_size,
            crop_box=image.crop_box,
            crop_top_left=image.crop_top_left,
            flipped_crop_top_left=image.flipped_crop_top_left,
            latents=shard("latents", key),
            text=shard("text", text_keys[image.caption]),
        )
        for image, key in zip(manifest.images, latent_keys, strict=True)
    ]
    return CacheIndex(
        name=spec.name,
        model=IndexedModel(name=ref.name, kind=ref.kind, fingerprint=ref.fingerprint),
        dtype=dtype_name,
        flip_augment=spec.flip_augment,
        cache_dir=str(store.root),
        dataset_dir=str(manifest.dataset_dir),
        empty_text=shard("text", text_keys[""]),
        images=images,
    )


def read_shard(store: ShardStore, entry: ShardRef) -> dict[str, torch.Tensor]:
    """A cached shard named in the index, verified; raises CorruptShard."""
    return store.read(entry.shard, entry.key)


STAGE = StageDef(
    "cache",
    "gpu",
    CacheSpec,
    run_cache,
    ladder=(
        MemoryRung("default", {"vae_batch_divisor": 1}),
        MemoryRung("half-vae-batch", {"vae_batch_divisor": 2}),
        MemoryRung("quarter-vae-batch", {"vae_batch_divisor": 4}),
        MemoryRung("vae-batch-1", {"vae_batch_divisor": 1 << 30}),
        MemoryRung("vae-tiling", {"vae_batch_divisor": 1 << 30, "vae_tiling": True}),
    ),
    priority=0,
    inputs=("manifest",),
)

__all__ = [
    "STAGE",
    "CacheIndex",
    "CacheResult",
    "CacheSpec",
    "CorruptShard",
    "IndexedImage",
    "ShardRef",
    "read_shard",
    "run_cache",
]
