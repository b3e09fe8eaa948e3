"""kohya's LoRA module names for the modules peft trained, per model family.

kohya names a LoRA module after the module it patches in the model kohya itself builds,
dots turned into underscores, behind a prefix per component:

- SDXL: the UNet in the original (SGM/LDM) layout, ``lora_unet_input_blocks_4_1_…``,
  ``lora_unet_middle_block_1_…``, ``lora_unet_output_blocks_…``; text encoders
  ``lora_te1_text_model_…`` (CLIP ViT-L) and ``lora_te2_text_model_…`` (OpenCLIP bigG).
- SD 1.5: the UNet in diffusers' layout, ``lora_unet_down_blocks_…``; the text encoder
  ``lora_te_text_model_…``.

transformers 5 dropped CLIPTextModel's ``text_model`` level, so it is put back here: the
names must not depend on the installed transformers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

UNET_PREFIX = "lora_unet_"
TEXT_PREFIXES = {
    ("sdxl", "text_encoder"): "lora_te1_",
    ("sdxl", "text_encoder_2"): "lora_te2_",
    ("sd15", "text_encoder"): "lora_te_",
}
TEXT_MODEL = "text_model."

# diffusers' resnet part → the SGM ResBlock part
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# layers outside the blocks
OUTER_LAYERS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def kohya_module_name(
    component: str, module: str, kind: str, unet_config: Mapping[str, Any]
) -> str:
    """The kohya name (no ``.lora_down.weight`` suffix) of a trained module's path."""
    if component == "unet":
        path = sgm_module_path(module, unet_config) if kind == "sdxl" else module
        return UNET_PREFIX + path.replace(".", "_")
    prefix = TEXT_PREFIXES[(kind, component)]
    path = module if module.startswith(TEXT_MODEL) else TEXT_MODEL + module
    return prefix + path.replace(".", "_")


def sgm_module_path(module: str, config: Mapping[str, Any]) -> str:
    """A diffusers UNet module path in the original SGM/LDM layout of the same UNet."""
    for diffusers_name, sgm_name in OUTER_LAYERS.items():
        if module == diffusers_name or module.startswith(diffusers_name + "."):
            return sgm_name + module[len(diffusers_name) :]
    layers = _layers_per_block(config)
    if match := _MID.match(module):
        part, index, rest = match[1], int(match[2]), match[3]
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_resnet_part(rest)}"
    match = _BLOCK.match(module)
    if match is None:
        raise ValueError(f"no SGM name for UNet module {module!r}")
    side, block, part, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
    # a down block is its resnets (with attention) then a downsampler: layers + 1 entries;
    # an up block has one resnet more and its upsampler shares the last entry
    per_block = layers + 1
    if side == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{per_block * (block + 1)}.0.{_sampler_part(rest, 'op')}"
        slot = 1 + per_block * block + index
    else:
        if part == "upsamplers":
            has_attention = "CrossAttn" in config["up_block_types"][block]
            slot = per_block * block + per_block - 1
            return f"output_blocks.{slot}.{2 if has_attention else 1}.{rest}"
        slot = per_block * block + index
    if part == "attentions":
        return f"{'input' if side == 'down_blocks' else 'output'}_blocks.{slot}.1.{rest}"
    return f"{'input' if side == 'down_blocks' else 'output'}_blocks.{slot}.0.{_resnet_part(rest)}"


def _resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = RESNET_PARTS.get(head, head)
    return f"{mapped}.{tail}" if tail else mapped


def _sampler_part(rest: str, name: str) -> str:
    head, _, tail = rest.partition(".")
    if head != "conv":
        raise ValueError(f"unexpected downsampler part {rest!r}")
    return f"{name}.{tail}" if tail else name


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError("SGM naming needs the same layers_per_block in every block")
        layers = layers[0]
    return int(layers)
