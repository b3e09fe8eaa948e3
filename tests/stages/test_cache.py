"""The cache stage: content-addressed latents and text embeddings, repair, ladder, stop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dataset_fixtures import FixtureImage, make_dataset, mixed_images, write_manifest

from dropkiln.stages.base import StageError, StageStopped
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import STAGE, CacheIndex, CacheResult, CacheSpec, read_shard
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.shards import CorruptShard, ShardStore
from dropkiln.stages.testing import LocalContext


def _context(root: Path, manifest: Path, **kwargs: Any) -> LocalContext:
    return LocalContext(
        root=root,
        work_dir=root / "state" / "work" / "cache",
        upstream_results={"bucket": BucketResult.of(manifest)},
        **kwargs,
    )


def _run(spec: CacheSpec, ctx: LocalContext) -> CacheResult:
    result = STAGE.run(spec, ctx)
    assert isinstance(result, CacheResult)
    return result


def _index(result: CacheResult) -> CacheIndex:
    return CacheIndex.load(result.index)


def test_cache_encodes_latents_and_both_text_encoders(dropkiln_root: Path) -> None:
    manifest = make_dataset(dropkiln_root, "cats", mixed_images(4))
    ctx = _context(dropkiln_root, manifest)
    result = _run(CacheSpec(name="cats", flip_augment=True), ctx)
    assert result.images == 4
    assert (result.encoded, result.reused) == (4, 0)
    index = _index(result)
    assert index.model.kind == "sdxl"
    store = ShardStore(Path(index.cache_dir))
    assert store.root == dropkiln_root / "state" / "cache"
    wide = next(e for e in index.images if e.bucket == (96, 64))
    latents = read_shard(store, wide.latents)
    assert latents["latents"].shape == (4, 8, 12)  # (C, H/8, W/8)
    assert latents["latents_flipped"].shape == (4, 8, 12)
    assert not latents["latents"].equal(latents["latents_flipped"])
    text = read_shard(store, wide.text)
    assert text["prompt_embeds"].shape == (77, 80)  # both encoders (32 + 48) side by side
    assert text["pooled_prompt_embeds"].shape == (48,)
    assert read_shard(store, index.empty_text)["prompt_embeds"].shape == (77, 80)
    assert ctx.artifacts == [(Path(result.index), "cache-index")]
    assert ctx.progress_log[-1][0] == ctx.progress_log[-1][1]


def test_sd15_text_shards_have_no_pooled_embedding(dropkiln_root: Path) -> None:
    manifest = make_dataset(dropkiln_root, "cats", mixed_images(2))
    result = _run(CacheSpec(name="cats", model="tiny-sd15"), _context(dropkiln_root, manifest))
    index = _index(result)
    text = read_shard(ShardStore(Path(index.cache_dir)), index.images[0].text)
    assert set(text) == {"prompt_embeds"}
    assert text["prompt_embeds"].shape == (77, 32)


def test_recache_with_one_image_changed_encodes_only_that_image(dropkiln_root: Path) -> None:
    images = mixed_images(4)
    manifest = make_dataset(dropkiln_root, "cats", images)
    first = _index(_run(CacheSpec(name="cats"), _context(dropkiln_root, manifest)))
    again = _run(CacheSpec(name="cats"), _context(dropkiln_root, manifest))
    assert (again.encoded, again.reused, again.captions_encoded) == (0, 4, 0)
    assert _index(again) == first

    changed = [*images[:3], FixtureImage("img03", (10, 10, 10), images[3].caption)]
    folder = dropkiln_root / "drop" / "datasets" / "cats"
    from dataset_fixtures import write_dataset

    write_dataset(folder, changed[3:])
    manifest = write_manifest(folder, changed, manifest, "cats")
    third = _run(CacheSpec(name="cats"), _context(dropkiln_root, manifest))
    assert (third.encoded, third.reused) == (1, 3)
    old, new = first.images, _index(third).images
    assert [a.latents == b.latents for a, b in zip(old, new, strict=True)] == [
        True,
        True,
        True,
        False,
    ]


def test_key_covers_model_dtype_and_flip(dropkiln_root: Path) -> None:
    manifest = make_dataset(dropkiln_root, "cats", mixed_images(2))
    keys = set()
    for spec in (
        CacheSpec(name="cats"),
        CacheSpec(name="cats", flip_augment=True),
        CacheSpec(name="cats", model="tiny-sd15"),
        CacheSpec(name="cats", dtype="bfloat16"),
    ):
        result = _run(spec, _context(dropkiln_root, manifest))
        assert result.encoded == 2
        keys.add(_index(result).images[0].latents.key)
    assert len(keys) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip-bits", "delete"])
def test_corrupt_shard_is_detected_and_reencoded(dropkiln_root: Path, damage: str) -> None:
    manifest = make_dataset(dropkiln_root, "cats", mixed_images(2))
    first = _run(CacheSpec(name="cats"), _context(dropkiln_root, manifest))
    index = _index(first)
    store = ShardStore(Path(index.cache_dir))
    entry = index.images[1].latents
    good = read_shard(store, entry)["latents"]
    path = store.root / entry.shard
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 20])
    elif damage == "flip-bits":
        path.write_bytes(data[:-7] + bytes([data[-7] ^ 0xFF]) + data[-6:])
    else:
        path.unlink()
    with pytest.raises(CorruptShard):
        read_shard(store, entry)
    again = _run(CacheSpec(name="cats"), _context(dropkiln_root, manifest))
    assert (again.encoded, again.reused) == (1, 1)
    assert read_shard(store, entry)["latents"].equal(good)


def test_image_changed_after_bucketing_is_a_clear_error(dropkiln_root: Path) -> None:
    manifest = make_dataset(dropkiln_root, "cats", mixed_images(2))
    (dropkiln_root / "drop" / "datasets" / "cats" / "img00.png").write_bytes(b"not the same")
    with pytest.raises(StageError, match="changed after it was bucketed"):
        STAGE.run(CacheSpec(name="cats"), _context(dropkiln_root, manifest))


def test_oom_steps_down_the_ladder_and_keeps_finished_shards(dropkiln_root: Path) -> None:
    assert [rung.name for rung in STAGE.ladder] == [
        "default",
        "half-vae-batch",
        "quarter-vae-batch",
        "vae-batch-1",
        "vae-tiling",
    ]
    import torch

    images = [FixtureImage(f"i{n}", (40 * n, 90, 20), f"tag {n}", size=(64, 64)) for n in range(6)]
    manifest = make_dataset(dropkiln_root, "six", images)
    faults = FaultInjector("oom@cache.batch:2")
    ctx = _context(dropkiln_root, manifest, faults=faults)
    spec = CacheSpec(name="six", vae_batch_size=4)
    with pytest.raises(torch.OutOfMemoryError):
        STAGE.run(spec, ctx)
    ctx.memory_rung = 1  # what the executor does next: one rung down, same job
    result = _run(spec, ctx)
    assert (result.encoded, result.reused) == (2, 4)  # the first batch of 4 survived
    ctx.memory_rung = 4
    tiled = _run(CacheSpec(name="six", flip_augment=True), ctx)
    assert tiled.encoded == 6


def test_should_stop_checkpoints_and_stops(dropkiln_root: Path) -> None:
    manifest = make_dataset(dropkiln_root, "cats", mixed_images(4))
    ctx = _context(dropkiln_root, manifest, stop_after=2)
    with pytest.raises(StageStopped):
        STAGE.run(CacheSpec(name="cats", vae_batch_size=1), ctx)
    assert ctx.checkpoints == [{"encoded": 1}]
    resumed = _run(CacheSpec(name="cats", vae_batch_size=1), _context(dropkiln_root, manifest))
    assert resumed.reused == 1


def test_unknown_model_fails_with_its_reason(dropkiln_root: Path) -> None:
    manifest = make_dataset(dropkiln_root, "cats", mixed_images(1))
    with pytest.raises(StageError, match="unknown model"):
        STAGE.run(CacheSpec(name="cats", model="nope"), _context(dropkiln_root, manifest))


def test_a_shard_made_again_alone_is_byte_identical(dropkiln_root: Path) -> None:
    """A retried cache job re-encodes only missing shards; they must equal the first run's.

    Convolutions pick kernels by batch size, so an image encoded beside others and the
    same image encoded alone differ in the last bits; that made a retried pipeline train a
    different LoRA from an undisturbed one. Only the default settings are held to this.
    """
    images = [FixtureImage(f"i{n}", (40 * n, 90, 20), f"tag {n}", size=(64, 64)) for n in range(4)]
    manifest = make_dataset(dropkiln_root, "four", images)
    first = _index(_run(CacheSpec(name="four"), _context(dropkiln_root, manifest)))
    store = ShardStore(Path(first.cache_dir))
    entry = first.images[2].latents
    shard = store.root / entry.shard
    original = shard.read_bytes()
    shard.unlink()
    again = _run(CacheSpec(name="four"), _context(dropkiln_root, manifest))
    assert again.encoded == 1
    assert _tensor_bytes(shard.read_bytes()) == _tensor_bytes(original)


def _tensor_bytes(blob: bytes) -> dict[str, bytes]:
    # the header's JSON key order is not stable between writes; the tensors are compared
    from safetensors.torch import load

    return {name: t.numpy().tobytes() for name, t in load(blob).items()}


def _index_as_written_before_its_model() -> dict[str, Any]:
    """A cache index as the cache stage wrote it when it built the JSON by hand."""
    shard = {"key": "ab" * 32, "shard": "latents/ab/" + "ab" * 32 + ".safetensors"}
    text = {"key": "cd" * 32, "shard": "text/cd/" + "cd" * 32 + ".safetensors"}
    return {
        "format": "dropkiln.latent-cache",
        "version": 1,
        "name": "cats",
        "model": {"name": "tiny-sdxl", "kind": "sdxl", "fingerprint": "f" * 64},
        "dtype": "float32",
        "flip_augment": True,
        "cache_dir": "/kiln/state/cache",
        "dataset_dir": "/kiln/drop/processed/1-cats",
        "empty_text": text,
        "images": [
            {
                "path": "sub/chat noir é.png",
                "sha256": "0" * 64,
                "caption": "sks cat, café",
                "bucket": [96, 64],
                "original_size": [300, 200],
                "resized_size": [96, 64],
                "crop_box": [0, 0, 96, 64],
                "crop_top_left": [0, 0],
                "flipped_crop_top_left": [0, 0],
                "latents": shard,
                "text": text,
            }
        ],
    }


def test_an_index_written_before_its_model_loads_and_writes_back_the_same_content(
    tmp_path: Path,
) -> None:
    written = json.dumps(_index_as_written_before_its_model(), indent=1)
    path = tmp_path / "cache-index.json"
    path.write_text(written)
    index = CacheIndex.load(path)
    assert index.images[0].bucket == (96, 64) and index.model.kind == "sdxl"
    again = index.write(tmp_path / "again.json").read_text()
    assert json.loads(again) == json.loads(written)
    # one image a line, ASCII escapes as json.dumps gives them
    lines = again.splitlines()
    for image in json.loads(written)["images"]:
        assert sum(line.strip().rstrip(",") == json.dumps(image) for line in lines) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"format": "dropkiln.bucket-manifest"}, "is not a latent cache index"),
        ({"version": 2}, "is format version 2, which this dropkiln does not read"),
        ({"empty_text": None}, "is damaged: empty_text: Input should be"),
    ],
)
def test_an_index_that_cannot_be_used_says_why(
    tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    path = tmp_path / "cache-index.json"
    path.write_text(json.dumps({**_index_as_written_before_its_model(), **change}))
    with pytest.raises(StageError, match=reason):
        CacheIndex.load(path)
