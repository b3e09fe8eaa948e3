"""The checkpoint hashes A1111, Civitai and kohya know a model by."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dropkiln.stages.models import ModelRef, checkpoint_files, checkpoint_hashes


def _bytes(size: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(size)


def test_single_file_hashes_follow_a1111s_rules(tmp_path: Path) -> None:
    """A1111's rules: the AutoV2 hash is the file's sha256 (first 10 hex shown); the old
    ``model_hash`` is the sha256 of the 64 KiB at offset 0x100000, first 8 hex."""
    data = _bytes(0x180000, 1)
    checkpoint = tmp_path / "juggernaut, v9.safetensors"
    checkpoint.write_bytes(data)
    ref = ModelRef("juggernaut, v9", "sdxl", checkpoint, "f" * 64, single_file=True)
    hashes = checkpoint_hashes(ref)
    assert hashes.sha256 == hashlib.sha256(data).hexdigest()
    assert hashes.autov2 == hashes.sha256[:10]
    assert hashes.legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # a file rewritten in place (new size or mtime) is hashed again, not served from memory
    checkpoint.write_bytes(data[:-1])
    os.utime(checkpoint, ns=(1, 1))
    assert checkpoint_hashes(ref).sha256 == hashlib.sha256(data[:-1]).hexdigest()


def test_a_diffusers_folder_is_known_by_its_unet_weights(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "model.safetensors").write_bytes(_bytes(100, 2))
    variant = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    variant.write_bytes(_bytes(64, 3))
    ref = ModelRef("model", "sd15", folder, "f" * 64)
    assert checkpoint_files(ref) == [variant]
    whole = folder / "unet" / "diffusion_pytorch_model.safetensors"
    whole.write_bytes(_bytes(200, 4))
    assert checkpoint_files(ref) == [whole]
    assert checkpoint_hashes(ref).sha256 == hashlib.sha256(whole.read_bytes()).hexdigest()
    whole.unlink()
    shards = [folder / "unet" / f"diffusion_pytorch_model-0000{n}-of-00002.safetensors"
              for n in (2, 1)]  # fmt: skip
    for number, shard in enumerate(shards):
        shard.write_bytes(_bytes(50, 10 + number))
    assert checkpoint_files(ref) == sorted(shards)
    joined = b"".join(p.read_bytes() for p in sorted(shards))
    assert checkpoint_hashes(ref).sha256 == hashlib.sha256(joined).hexdigest()


def test_a_folder_without_unet_weights_is_a_clear_error(tmp_path: Path) -> None:
    from dropkiln.stages.base import StageError

    (tmp_path / "unet").mkdir()
    with pytest.raises(StageError, match="no unet"):
        checkpoint_files(ModelRef("m", "sd15", tmp_path, "f" * 64))
