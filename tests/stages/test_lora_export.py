"""LoRA files: the kohya and diffusers formats load in diffusers and reproduce the adapter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from dropkiln.config import TrainSettings
from dropkiln.stages.generation.lora_loading import load_lora
from dropkiln.stages.models import CheckpointHashes, load_pipeline, pipeline_class, resolve_model
from dropkiln.stages.models.encoding import encode_captions
from dropkiln.stages.training.adapters import lora_adapters
from dropkiln.stages.training.lora_export import DIFFUSERS_WEIGHTS, write_diffusers, write_kohya


def _facts(kind: str, options: TrainSettings) -> dict[str, Any]:
    return {
        "name": "cats",
        "kind": kind,
        "model_name": f"tiny-{kind}",
        "model_hashes": CheckpointHashes("0" * 64, "0" * 8),
        "session_id": 1,
        "images": [((64, 64), (80, 64))],
        "batches_per_epoch": 1,
        "epoch": 1,
        "num_epochs": 1,
        "resolution": (64, 64),
        "options": options,
        "alpha": options.alpha,
        "steps": 1,
        "num_images": 1,
        "tag_frequency": {"sks cat": 1},
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "started_at": time.time(),
        "finished_at": time.time(),
        "finished_date": "2025-01-01",
    }


def _unet_output(pipe: Any, kind: str) -> Any:
    import torch

    generator = torch.Generator().manual_seed(5)
    width = 80 if kind == "sdxl" else 32
    sample = torch.randn((2, 4, 8, 8), generator=generator)
    text = torch.randn((2, 77, width), generator=generator)
    extra: dict[str, Any] = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn((2, 48), generator=generator),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    with torch.no_grad():
        return pipe.unet(
            sample, torch.tensor([10, 700]), encoder_hidden_states=text, **extra
        ).sample


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_exported_files_reproduce_the_in_memory_adapter(
    kind: str, models_dir: Path, tmp_path: Path
) -> None:
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    pipe = load_pipeline(resolve_model(f"tiny-{kind}", models_dir), "cpu", torch.float32)
    options = TrainSettings(rank=4, alpha=2.0, train_text_encoder=True)
    torch.manual_seed(0)
    kohya = tmp_path / "cats.safetensors"
    with lora_adapters(pipe, options, gradient_checkpointing=False) as models:
        with torch.no_grad():
            for param in models.trainable.values():
                param.normal_(0.0, 0.2)  # lora_B starts at zero; make the adapter matter
        for model in models.models.values():
            model.eval()
        expected_unet = _unet_output(pipe, kind)
        with torch.no_grad():
            expected_text = encode_captions(pipe, ["sks cat, red hair"])
        write_kohya(kohya, models, _facts(kind, options))
        folder = write_diffusers(tmp_path / "diffusers", pipeline_class(kind), models).parent
        # the kohya layout other trainers write with diffusers' converter: diffusers names
        prefixed = {f"{c}.{k}": v for c in models.models for k, v in models.lora_state(c).items()}
        other = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(prefixed).items()}
        for key in [k for k in other if k.endswith(".alpha")]:
            other[key] = torch.tensor(options.alpha)
        diffusers_names = tmp_path / "diffusers-names.safetensors"
        save_file(other, str(diffusers_names))
        prefixes = {key.split("_")[1] for key in load_file(kohya)}
    assert prefixes == ({"unet", "te1", "te2"} if kind == "sdxl" else {"unet", "te"})
    assert not torch.allclose(_unet_output(pipe, kind), expected_unet, atol=1e-4)

    plain_text = encode_captions(pipe, ["sks cat, red hair"])
    assert any(k.startswith("lora_unet_down_blocks_") for k in load_file(diffusers_names))
    for source in (kohya, diffusers_names, folder / DIFFUSERS_WEIGHTS):
        # dropkiln's generation loader: diffusers for the UNet, peft for the text encoders
        load_lora(pipe, source, "loaded")
        torch.testing.assert_close(_unet_output(pipe, kind), expected_unet, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            loaded_text = encode_captions(pipe, ["sks cat, red hair"])
        for key, value in expected_text.items():
            torch.testing.assert_close(loaded_text[key], value, atol=1e-5, rtol=1e-4)
        pipe.set_adapters(["loaded"], adapter_weights=[0.0])  # weight 0: the base model
        with torch.no_grad():
            silenced = encode_captions(pipe, ["sks cat, red hair"])
        for key, value in plain_text.items():
            torch.testing.assert_close(silenced[key], value, atol=1e-6, rtol=0)
        pipe.unload_lora_weights()
        with torch.no_grad():
            unloaded_text = encode_captions(pipe, ["sks cat, red hair"])
        for key, value in plain_text.items():
            torch.testing.assert_close(unloaded_text[key], value, atol=0, rtol=0)


def test_text_encoder_weights_that_fit_no_module_are_refused(
    models_dir: Path, tmp_path: Path
) -> None:
    """A LoRA made for a deeper text encoder must not load half-way: diffusers only warns
    about text-encoder keys that match no module; dropkiln refuses the file."""
    import torch
    from safetensors.torch import load_file, save_file

    from dropkiln.stages.generation.lora_loading import LoraMismatch

    pipe = load_pipeline(resolve_model("tiny-sd15", models_dir), "cpu", torch.float32)
    options = TrainSettings(rank=4, alpha=2.0, train_text_encoder=True)
    kohya = tmp_path / "cats.safetensors"
    with lora_adapters(pipe, options, gradient_checkpointing=False) as models:
        write_kohya(kohya, models, _facts("sd15", options))
    tensors = load_file(kohya)
    deeper = "lora_te_text_model_encoder_layers_99_self_attn_q_proj"
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        tensors[f"{deeper}.{part}"] = tensors[f"{deeper.replace('99', '0')}.{part}"].clone()
    save_file(tensors, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(LoraMismatch, match="match no module"):
        load_lora(pipe, tmp_path / "deeper.safetensors", "deeper")
    pipe.unload_lora_weights()
    load_lora(pipe, kohya, "fits")  # the pipeline is usable afterwards
    pipe.unload_lora_weights()


def test_text_encoder_lora_loads_after_a_clip_skip_render(models_dir: Path, tmp_path: Path) -> None:
    """Clip skip gives transformers 5's flat CLIPTextModel a ``text_model`` alias (not a
    module); the loader must still see a flat model and drop the files' text_model level."""
    import torch

    from dropkiln.stages.generation.render import diffusers_clip_skip

    pipe = load_pipeline(resolve_model("tiny-sd15", models_dir), "cpu", torch.float32)
    options = TrainSettings(rank=4, alpha=2.0, train_text_encoder=True)
    kohya = tmp_path / "cats.safetensors"
    with lora_adapters(pipe, options, gradient_checkpointing=False) as models:
        write_kohya(kohya, models, _facts("sd15", options))
    diffusers_clip_skip(pipe, 2)
    try:
        load_lora(pipe, kohya, "after-clip-skip")
    finally:
        pipe.unload_lora_weights()
