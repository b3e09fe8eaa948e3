"""The tiny built-in models: real diffusers/transformers classes with small widths.

``tiny-sdxl`` and ``tiny-sd15`` take their weights from a fixed seed through numpy's PCG64
stream (whose uniform doubles are stable across versions and machines), not from torch's
initialisers (which may change between releases), so every machine builds identical
weights. The images they make are noise; they exist so the whole pipeline runs anywhere in
seconds. ``tiny-shapes`` (shapes_model.py) starts from the same kind of seeded weights and
ships trained ones: it draws coloured shapes that its prompts name.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dropkiln.stages.models.offline import enforce_offline, quiet_libraries
from dropkiln.stages.models.tokenizer import (
    CAPTION_WORDS,
    MAX_LENGTH,
    special_token_ids,
    write_tokenizer,
)

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextConfig

TinyName = Literal["tiny-shapes", "tiny-sdxl", "tiny-sd15"]
TINY_NAMES: tuple[TinyName, ...] = ("tiny-shapes", "tiny-sdxl", "tiny-sd15")
TINY_SEED = 20240601
TEXT_WIDTH = 32
TEXT_WIDTH_2 = 48
"""SDXL's second encoder is wider, as bigG (1280) is beside CLIP-L (768); single-file
loaders tell the two apart by width."""

# Stable Diffusion's training noise schedule; generation uses Euler on the same betas.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def ensure_tiny_model(name: TinyName, models_dir: Path) -> Path:
    """The tiny model's diffusers folder under ``models_dir``, built once, atomically."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {TINY_NAMES}")
    # Resolved, so a symlinked models folder names the same warm pipeline.
    target = Path(models_dir).resolve() / _folder_name(name)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        _build(name, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _folder_name(name: TinyName) -> str:
    # Trained weights change between releases; a folder per weights file keeps a built
    # folder immutable, so an upgrade never loads the weights of the release before.
    if name == "tiny-shapes":
        from dropkiln.stages.models.shapes_model import SHAPES_WEIGHTS_SHA256

        return f"{name}-{SHAPES_WEIGHTS_SHA256[:12]}"
    return name


def tiny_components(name: TinyName) -> dict[str, Any]:
    """Build the tiny model's components in memory (deterministic weights)."""
    enforce_offline()
    quiet_libraries()
    if name == "tiny-shapes":
        from dropkiln.stages.models.shapes_model import shapes_components

        return shapes_components()
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = name == "tiny-sdxl"
    bos, eos = special_token_ids()

    def text_config(width: int) -> CLIPTextConfig:
        return tiny_text_config(width, bos, eos)

    components: dict[str, Any] = {"text_encoder": CLIPTextModel(text_config(TEXT_WIDTH))}
    unet_options: dict[str, Any] = {}
    if sdxl:
        components["text_encoder_2"] = CLIPTextModelWithProjection(text_config(TEXT_WIDTH_2))
        time_embed_dim = 8
        unet_options = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed_dim,
            "projection_class_embeddings_input_dim": 6 * time_embed_dim + TEXT_WIDTH_2,
            "use_linear_projection": True,
        }
    components["unet"] = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2 if sdxl else TEXT_WIDTH,
        **unet_options,
    )
    components["vae"] = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025 if sdxl else 0.18215,
        force_upcast=False,
    )
    components["scheduler"] = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    for index, key in enumerate(sorted(k for k in components if k != "scheduler")):
        seed_weights(components[key], TINY_SEED + index)
    return components


def weights_checksum(components: dict[str, Any]) -> str:
    """sha256 over every component's tensors (names, dtypes, shapes, bytes), in a fixed order."""
    digest = hashlib.sha256()
    for key in sorted(components):
        module = components[key]
        if not hasattr(module, "state_dict"):
            continue
        for tensor_name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{key}.{tensor_name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _build(name: TinyName, folder: Path) -> None:
    from dropkiln.stages.models.shapes_model import SHAPES_WORDS

    components = tiny_components(name)
    sdxl = name != "tiny-sd15"
    words = SHAPES_WORDS if name == "tiny-shapes" else CAPTION_WORDS
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if key in components:
            components[key].save_pretrained(folder / key, safe_serialization=True)
    components["scheduler"].save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer", words)
    if sdxl:
        write_tokenizer(folder / "tokenizer_2", words)
    (folder / "model_index.json").write_text(json.dumps(_model_index(sdxl), indent=2))
    (folder / "dropkiln-tiny.json").write_text(
        json.dumps({"name": name, "seed": TINY_SEED, "weights": weights_checksum(components)})
    )


def _model_index(sdxl: bool) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
    return index


def seed_weights(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a PCG64 stream, in sorted name order."""
    import numpy as np
    import torch

    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    kinds: dict[str, str] = {}
    for module_name, child in module.named_modules():
        for param_name, _ in child.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(child, norm_types):
                kinds[full] = "one" if param_name == "weight" else "zero"
            elif isinstance(child, torch.nn.Embedding):
                kinds[full] = "embedding"
            else:
                kinds[full] = "fan_in"
    generator = np.random.Generator(np.random.PCG64(seed))
    parameters = dict(module.named_parameters())
    fan_ins = _fan_ins(module)
    with torch.no_grad():
        for name in sorted(parameters):
            param = parameters[name]
            kind = kinds.get(name, "fan_in")
            if kind == "one":
                values = np.ones(param.shape, dtype=np.float32)
            elif kind == "zero":
                values = np.zeros(param.shape, dtype=np.float32)
            else:
                # The same spread as torch's default init: uniform in ±1/sqrt(fan_in).
                bound = 0.02 * math.sqrt(3) if kind == "embedding" else fan_ins.get(name, 1.0)
                uniform = generator.random(param.numel(), dtype=np.float64)
                values = ((uniform * 2.0 - 1.0) * bound).astype(np.float32).reshape(param.shape)
            param.copy_(torch.from_numpy(values))


def _fan_ins(module: torch.nn.Module) -> dict[str, float]:
    """1/sqrt(fan_in) per parameter; a bias shares its layer's weight fan-in."""
    bounds: dict[str, float] = {}
    for module_name, child in module.named_modules():
        weight = getattr(child, "weight", None)
        prefix = f"{module_name}." if module_name else ""
        own = dict(child.named_parameters(recurse=False))
        if weight is not None and "weight" in own and weight.dim() >= 2:
            fan_in = weight.shape[1] * math.prod(weight.shape[2:])
            for param_name in own:
                bounds[prefix + param_name] = 1.0 / math.sqrt(fan_in)
        else:
            for param_name, param in own.items():
                fan_in = param.shape[-1] if param.dim() >= 1 else 1
                bounds[prefix + param_name] = 1.0 / math.sqrt(max(int(fan_in), 1))
    return bounds


def tiny_text_config(width: int, bos: int, eos: int) -> CLIPTextConfig:
    """The CLIP text encoder of the built-in models: 3 layers at ``width``, the local
    tokenizer's vocabulary (its end token is the last id and pads)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=eos + 1,
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
