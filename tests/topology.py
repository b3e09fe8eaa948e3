"""Models with the real SDXL-base and SD 1.5 module trees, at small widths.

The published component configs (diffusers' ``unet/config.json`` and transformers'
``text_encoder*/config.json`` of stabilityai/stable-diffusion-xl-base-1.0 and
runwayml/stable-diffusion-v1-5) are kept here in one place. ``real_topology`` shrinks their
widths only (channels, cross-attention width, head counts, text hidden sizes): every block,
layer count and module name stays, so key names derived from these models are the real ones.
"""

from __future__ import annotations

import math
from typing import Any

SDXL_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}
CLIP_VIT_L: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
OPEN_CLIP_BIG_G: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}
PUBLISHED = {
    "sdxl": {"unet": SDXL_BASE_UNET, "text_encoder": CLIP_VIT_L, "text_encoder_2": OPEN_CLIP_BIG_G},
    "sd15": {"unet": SD15_UNET, "text_encoder": CLIP_VIT_L},
}
GROUPS = 8
"""GroupNorm groups of the miniatures (their channel counts are multiples of 8)."""


def shrunk_configs(kind: str, scale: int) -> dict[str, dict[str, Any]]:
    """The published configs with widths divided by ``scale`` (1 gives them unchanged)."""
    published = PUBLISHED[kind]
    if scale == 1:
        return {name: dict(config) for name, config in published.items()}
    texts = {name: _text(config, scale) for name, config in published.items() if name != "unet"}
    unet = dict(published["unet"])
    channels = [_width(c, scale) for c in unet["block_out_channels"]]
    heads = unet["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(channels)
    unet["block_out_channels"] = channels
    unet["attention_head_dim"] = [
        math.gcd(max(1, h // scale), c) for h, c in zip(heads, channels, strict=True)
    ]
    unet["norm_num_groups"] = GROUPS
    # the UNet attends to the text encoders' hidden states, side by side for SDXL
    unet["cross_attention_dim"] = sum(t["hidden_size"] for t in texts.values())
    if kind == "sdxl":
        time_dim = _width(unet["addition_time_embed_dim"], scale)
        unet["addition_time_embed_dim"] = time_dim
        unet["addition_embed_type_num_heads"] = max(
            1, unet["addition_embed_type_num_heads"] // scale
        )
        pooled = texts["text_encoder_2"]["projection_dim"]
        unet["projection_class_embeddings_input_dim"] = pooled + 6 * time_dim
    return {"unet": unet, **texts}


def real_topology(kind: str, scale: int = 10, device: str = "cpu") -> dict[str, Any]:
    """The UNet and text encoder(s) of ``kind`` ("sdxl" or "sd15"), widths / ``scale``.

    Built on the meta device (any scale, including the full models, costs nothing), then,
    unless ``device`` is "meta", given zeroed storage there: these models are for their
    names and shapes, not their outputs."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = shrunk_configs(kind, scale)
    with torch.device("meta"):
        models: dict[str, Any] = {"unet": UNet2DConditionModel(**configs["unet"])}
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        if kind == "sdxl":
            config = CLIPTextConfig(**configs["text_encoder_2"])
            models["text_encoder_2"] = CLIPTextModelWithProjection(config)
    for name, model in models.items():
        if device != "meta":
            model = models[name] = model.to_empty(device=device)
            with torch.no_grad():
                for tensor in (*model.parameters(), *model.buffers()):
                    tensor.zero_()
        model.eval().requires_grad_(False)
    return models


def _text(config: dict[str, Any], scale: int) -> dict[str, Any]:
    text = dict(config)
    heads = max(1, config["num_attention_heads"] // scale)
    text["num_attention_heads"] = heads
    text["hidden_size"] = _width(config["hidden_size"], scale, multiple=8 * heads)
    text["intermediate_size"] = _width(config["intermediate_size"], scale)
    text["projection_dim"] = _width(config["projection_dim"], scale)
    return text


def _width(value: int, scale: int, multiple: int = GROUPS) -> int:
    return max(multiple, round(value / scale / multiple) * multiple)
