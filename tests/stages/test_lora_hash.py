"""The LoRA hash in generated images is the one A1111 and Civitai compute (AutoV3)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dropkiln.stages.models.refs import safetensors_data_sha256 as lora_sha256
from dropkiln.stages.training.lora_export import tensor_data_sha256


def test_lora_hash_covers_the_tensors_not_the_header(tmp_path: Path) -> None:
    tensors = {"a.lora_down.weight": torch.arange(12.0).reshape(3, 4), "a.alpha": torch.tensor(4.0)}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file(tensors, str(first), metadata={"ss_training_finished_at": "1"})
    save_file(tensors, str(second), metadata={"ss_training_finished_at": "2", "more": "x"})
    assert first.read_bytes() != second.read_bytes()

    assert lora_sha256(first) == lora_sha256(second) == tensor_data_sha256(tensors)
    changed = tmp_path / "changed.safetensors"
    save_file({**tensors, "a.alpha": torch.tensor(2.0)}, str(changed))
    assert lora_sha256(changed) != lora_sha256(first)
