"""Write a diffusers folder as an original (LDM) single-file checkpoint, for loader tests.

The inverse of diffusers' single-file conversion, derived from the component configs so it
fits any block count (the tiny models have two UNet blocks and one resnet per block).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESNET_PARTS = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
UNET_LAYERS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def write_single_file(folder: Path, target: Path) -> Path:
    """Convert the SD 1.5 or SDXL diffusers ``folder`` into one LDM-keyed safetensors file."""
    from safetensors.torch import load_file, save_file

    sdxl = (folder / "text_encoder_2").is_dir()
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    state: dict[str, Any] = {}
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for key, value in _unet_keys(unet, unet_config).items():
        state["model.diffusion_model." + key] = value
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    for key, value in _vae_keys(vae, vae_config).items():
        state["first_stage_model." + key] = value
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, value in text.items():
        if not key.endswith("position_ids"):
            # Original checkpoints keep CLIP's text_model level (transformers 5 saves it flat).
            state[prefix + "text_model." + key.removeprefix("text_model.")] = value
    if sdxl:
        text_2 = load_file(str(folder / "text_encoder_2" / "model.safetensors"))
        for key, value in _open_clip_keys(text_2).items():
            state["conditioner.embedders.1.model." + key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def _unet_keys(weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    per_block = config["layers_per_block"] + 1
    blocks = len(config["block_out_channels"])
    prefixes: list[tuple[str, str]] = []
    for i in range(blocks):
        for j in range(config["layers_per_block"]):
            slot = per_block * i + j + 1
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{slot}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{slot}.1."))
        if i < blocks - 1:
            prefixes.append(
                (
                    f"down_blocks.{i}.downsamplers.0.conv.",
                    f"input_blocks.{per_block * (i + 1)}.0.op.",
                )
            )
        up_has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per_block):
            slot = per_block * i + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{slot}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{slot}.1."))
        if i < blocks - 1:
            index = 2 if up_has_attention else 1
            slot = per_block * i + per_block - 1
            prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{slot}.{index}."))
    prefixes += [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    converted = {}
    for key, value in weights.items():
        new = key
        for old_layer, ldm_layer in UNET_LAYERS.items():
            if key.startswith(old_layer + "."):
                new = ldm_layer + key[len(old_layer) :]
        for old, ldm in prefixes:
            if new.startswith(old):
                rest = new[len(old) :]
                if ".resnets." in old:
                    for part, ldm_part in RESNET_PARTS:
                        if rest.startswith(part + "."):
                            rest = ldm_part + rest[len(part) :]
                new = ldm + rest
                break
        converted[new] = value
    return converted


def _vae_keys(weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    blocks = len(config["block_out_channels"])
    converted = {}
    for key, value in weights.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for i in range(blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(
                f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."
            )
            up = blocks - 1 - i
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.")
        for k in range(2):
            new = new.replace(f"mid_block.resnets.{k}.", f"mid.block_{k + 1}.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, ldm in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k.")):
                new = new.replace(old, ldm)
            new = new.replace("to_v.", "v.").replace("to_out.0.", "proj_out.")
            if new.endswith("weight") and value.dim() == 2:
                value = value.reshape(*value.shape, 1, 1)  # LDM uses 1x1 convolutions here
        converted[new] = value
    return converted


def _open_clip_keys(weights: dict[str, Any]) -> dict[str, Any]:
    import torch

    converted: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, value in weights.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()
            continue
        new = (
            key.replace("text_model.encoder.layers.", "transformer.resblocks.")
            .replace("layer_norm1", "ln_1")
            .replace("layer_norm2", "ln_2")
            .replace(".mlp.fc1.", ".mlp.c_fc.")
            .replace(".mlp.fc2.", ".mlp.c_proj.")
            .replace(".self_attn.", ".attn.")
            .replace("text_model.final_layer_norm.", "ln_final.")
            .replace("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
            .replace("text_model.embeddings.position_embedding.weight", "positional_embedding")
        )
        for projection in ("q_proj", "k_proj", "v_proj"):
            marker = f".attn.{projection}."
            if marker in new:
                stem, kind = new.split(marker)
                fused.setdefault(f"{stem}.attn.in_proj_{kind}", {})[projection] = value
                break
        else:
            converted[new] = value
    for key, parts in fused.items():
        converted[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return converted
