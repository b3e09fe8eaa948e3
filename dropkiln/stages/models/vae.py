"""A standalone VAE file (the ``vae`` setting) in place of the model's own.

Two layouts are in use: diffusers' AutoencoderKL names (``encoder.down_blocks.0.…``, as
``diffusion_pytorch_model.safetensors``) and the original LDM names (``encoder.down.0.…``,
as ``sdxl_vae.safetensors`` and the SDXL fp16-fix VAE, with no ``first_stage_model.``
prefix; a prefixed VAE-only file reads the same). SD 1.5 and SDXL share one VAE
architecture with 4 latent channels, so a VAE fits either family's model; a 16-channel VAE
(SD3, Flux) does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dropkiln.stages.base import StageError
from dropkiln.stages.models.single_file import read_header, tensor_shape

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

VaeLayout = Literal["diffusers", "ldm"]
LATENT_CHANNELS = 4
_LDM_PREFIX = "first_stage_model."
_FULL_CHECKPOINT = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")
PICKLE_REFUSAL = "pickled .ckpt/.bin/.pt files are never loaded"


def vae_layout(path: Path) -> VaeLayout:
    """Which layout a VAE file is in; a StageError naming the file says why it is not one."""
    if path.suffix != ".safetensors":
        raise StageError(f"{path.name} is not a .safetensors VAE ({PICKLE_REFUSAL})")
    if not path.is_file():
        raise StageError(f"{path} does not exist")
    keys, _ = read_header(path)
    if any(k.startswith(_FULL_CHECKPOINT) for k in keys):
        raise StageError(f"{path.name} is a whole checkpoint, not a VAE (name it as the model)")
    names = {k.removeprefix(_LDM_PREFIX) for k in keys}
    if any(k.startswith("encoder.down_blocks.") for k in names):
        layout: VaeLayout = "diffusers"
    elif any(k.startswith("encoder.down.") for k in names):
        layout = "ldm"
    else:
        raise StageError(f"{path.name} is not an AutoencoderKL VAE (no encoder blocks in it)")
    channels = _latent_channels(path, keys)
    if channels != LATENT_CHANNELS:
        raise StageError(
            f"{path.name} is a {channels}-channel VAE; SD 1.5 and SDXL use {LATENT_CHANNELS}"
        )
    return layout


def _latent_channels(path: Path, keys: list[str]) -> int:
    name = next((k for k in keys if k.removeprefix(_LDM_PREFIX) == "post_quant_conv.weight"), None)
    if name is None:
        raise StageError(f"{path.name} has no post_quant_conv: not an SD/SDXL VAE")
    shape = tensor_shape(path, name)
    return shape[1] if len(shape) > 1 else 0


def load_vae(path: Path, config_dir: Path, dtype: torch.dtype) -> AutoencoderKL:
    """The AutoencoderKL in ``path`` with the model's VAE config (``config_dir``/vae)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    layout = vae_layout(path)
    try:
        if layout == "ldm":
            return AutoencoderKL.from_single_file(
                str(path),
                config=str(config_dir),
                subfolder="vae",
                dtype=dtype,
                local_files_only=True,
            )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir / "vae")))
        vae.load_state_dict(load_file(str(path)), strict=True)
        return vae.to(dtype)
    except (RuntimeError, ValueError, OSError) as exc:
        raise StageError(f"VAE {path.name} does not fit the model: {exc}") from exc
