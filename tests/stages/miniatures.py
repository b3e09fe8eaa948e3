"""Real-topology miniatures of SDXL base and SD 1.5, as original single-file checkpoints.

Each starts from the component configs dropkiln ships and shrinks only widths: the same
block types, resnets per block, transformer depths ([1, 2, 10] in SDXL), attention head
counts, text-encoder layer counts (12 and 32) and CLIP's 49,408-token vocabulary, so every
tensor name of the real file is there. The weights are saved twice: as a diffusers folder
(the twin, loaded with ``from_pretrained``) and, through ``ldm_checkpoint``, as one
original-layout ``.safetensors`` file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropkiln.stages.models.single_file import SHIPPED_CONFIGS

# Width multiples keep every head count of the real model (SDXL's attention_head_dim
# [5, 10, 20] and SD 1.5's 8 are head counts in diffusers; CLIP-L has 12 heads, bigG 20).
CLIP_L_WIDTH = 48
BIG_G_WIDTH = 80
TIME_EMBED_WIDTH = 8
SHRINK: dict[str, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "unet": {
            "block_out_channels": [40, 80, 160],
            "norm_num_groups": 8,
            "cross_attention_dim": CLIP_L_WIDTH + BIG_G_WIDTH,
            "addition_time_embed_dim": TIME_EMBED_WIDTH,
            "projection_class_embeddings_input_dim": 6 * TIME_EMBED_WIDTH + BIG_G_WIDTH,
            "sample_size": 8,
        },
        "vae": {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "sample_size": 64},
        "text_encoder": {"hidden_size": CLIP_L_WIDTH, "intermediate_size": 4 * CLIP_L_WIDTH},
        "text_encoder_2": {
            "hidden_size": BIG_G_WIDTH,
            "intermediate_size": 4 * BIG_G_WIDTH,
            "projection_dim": BIG_G_WIDTH,
        },
    },
    "sd15": {
        "unet": {
            "block_out_channels": [32, 64, 128, 128],
            "norm_num_groups": 8,
            "cross_attention_dim": CLIP_L_WIDTH,
            "sample_size": 8,
        },
        "vae": {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "sample_size": 64},
        "text_encoder": {"hidden_size": CLIP_L_WIDTH, "intermediate_size": 4 * CLIP_L_WIDTH},
    },
}


@dataclass(frozen=True)
class Miniature:
    """One miniature: its single file, its diffusers twin and the shrunk config root."""

    kind: str
    checkpoint: Path
    twin: Path
    config_root: Path


def miniature_configs(kind: str, config_root: Path) -> Path:
    """Copy the shipped ``kind`` configs under ``config_root`` with the widths shrunk."""
    target = config_root / kind
    shutil.copytree(SHIPPED_CONFIGS / kind, target)
    for component, changes in SHRINK[kind].items():
        path = target / component / "config.json"
        config = json.loads(path.read_text())
        assert set(changes) <= set(config), f"{component}: not a config key"
        path.write_text(json.dumps({**config, **changes}, indent=2))
    return target


def build_miniature(kind: str, folder: Path, seed: int = 7) -> Miniature:
    """Write the miniature's configs, diffusers twin and single-file checkpoint in ``folder``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ldm_checkpoint import write_single_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dropkiln.stages.models.clip_tokenizer import clip_tokenizer

    configs = miniature_configs(kind, folder / "configs")
    twin = folder / f"{kind}-twin"
    shutil.copytree(configs, twin)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    parts: dict[str, Any] = {"unet": unet, "vae": vae, "text_encoder": text}
    if kind == "sdxl":
        big_g = CLIPTextConfig.from_pretrained(configs / "text_encoder_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection(big_g)
    _spread_norms(parts)
    for name, module in parts.items():
        module.save_pretrained(twin / name, safe_serialization=True)
    clip_tokenizer("endoftext").save_pretrained(twin / "tokenizer")
    if kind == "sdxl":
        clip_tokenizer("zero").save_pretrained(twin / "tokenizer_2")
    checkpoint = write_single_file(twin, folder / f"{kind}-miniature.safetensors")
    return Miniature(kind, checkpoint, twin, folder / "configs")


def write_standalone_vae(vae_folder: Path, target: Path, layout: str) -> Path:
    """A VAE file alone: diffusers AutoencoderKL keys, or original keys without a prefix
    (the layout of ``sdxl_vae.safetensors`` and the SDXL fp16-fix VAE)."""
    from ldm_checkpoint import _vae_keys
    from safetensors.torch import load_file, save_file

    weights = load_file(str(vae_folder / "diffusion_pytorch_model.safetensors"))
    if layout == "ldm":
        config = json.loads((vae_folder / "config.json").read_text())
        weights = _vae_keys(weights, config)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(target))
    return target


def _spread_norms(parts: dict[str, Any]) -> None:
    """Norm weights away from 1/0, so a norm that failed to load changes the image."""
    import torch

    with torch.no_grad():
        for module in parts.values():
            for child in module.modules():
                if isinstance(child, torch.nn.GroupNorm | torch.nn.LayerNorm):
                    child.weight.uniform_(0.5, 1.5)
                    child.bias.uniform_(-0.2, 0.2)


def render(pipe: Any, **extra: Any) -> Any:
    """Two Euler steps at 64×64 from a fixed seed, as float pixels."""
    import torch

    return pipe(
        "a photo of a cat",
        negative_prompt="blurry",
        num_inference_steps=2,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        **extra,
    ).images


def fresh_memory(pipe: Any) -> Any:
    """Copy every weight into freshly allocated memory. Bit-identical weights read from
    differently placed buffers (a memory-mapped file vs a fresh load) can make the CPU's
    BLAS sum in another order, which moves the last float bits."""
    import torch

    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for param in component.parameters():
                    param.data = param.data.clone()
    return pipe
