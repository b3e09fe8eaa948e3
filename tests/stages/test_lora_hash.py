"""The LoRA hash in generated images is the one A1111 and Civitai compute (AutoV3)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dropkiln.stages.models.hashes import legacy_model_hash
from dropkiln.stages.models.refs import safetensors_data_sha256 as lora_sha256
from dropkiln.stages.training.lora_export import safetensors_hashes


def test_lora_hash_covers_the_tensors_not_the_header(tmp_path: Path) -> None:
    tensors = {"a.lora_down.weight": torch.arange(12.0).reshape(3, 4), "a.alpha": torch.tensor(4.0)}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file(tensors, str(first), metadata={"ss_training_finished_at": "1"})
    save_file(tensors, str(second), metadata={"ss_training_finished_at": "2", "more": "x"})
    assert first.read_bytes() != second.read_bytes()

    assert lora_sha256(first) == lora_sha256(second) == safetensors_hashes(tensors, {})[0]
    changed = tmp_path / "changed.safetensors"
    save_file({**tensors, "a.alpha": torch.tensor(2.0)}, str(changed))
    assert lora_sha256(changed) != lora_sha256(first)


def test_sshs_hashes_are_those_of_the_file_with_only_training_metadata(tmp_path: Path) -> None:
    """kohya's rule: both ``sshs_*`` hashes are taken over the file as it would be with only
    the ``ss_*`` keys in its header: ``sshs_model_hash`` the sha256 of the data section,
    ``sshs_legacy_hash`` A1111's old model hash (sha256 of 64 KiB at offset 1 MiB, 8 hex)."""
    generator = torch.Generator().manual_seed(3)
    tensors = {"b.lora_up.weight": torch.randn(512, 1024, generator=generator)}  # 2 MiB
    metadata = {"ss_output_name": "cats", "ss_seed": "1", "modelspec.title": "cats"}
    model_hash, legacy = safetensors_hashes(tensors, metadata)
    training_only = tmp_path / "training-only.safetensors"
    save_file(tensors, str(training_only), metadata={"ss_output_name": "cats", "ss_seed": "1"})
    assert legacy == legacy_model_hash(training_only)
    assert model_hash == lora_sha256(training_only)
    assert legacy != safetensors_hashes(tensors, {"ss_output_name": "dogs"})[1]
