"""The ``vae`` setting: a standalone VAE file swaps in as diffusers' ``vae=`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dropkiln.stages.base import StageError
from dropkiln.stages.models import load_pipeline, resolve_model


def _header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, str(path))
    return path


def _sdxl_file(tmp_path: Path) -> Path:
    return _header_only(
        tmp_path / "xl.safetensors",
        {
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (1,),
            "conditioner.embedders.1.model.ln_final.weight": (1,),
        },
    )


@pytest.mark.parametrize(
    ("vae_keys", "message"),
    [
        ({"encoder.down.0.block.0.conv1.weight": (1,), "post_quant_conv.weight": (16, 16, 1, 1)},
         "16-channel VAE"),
        ({"model.diffusion_model.out.2.weight": (1,)}, "whole checkpoint"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (1,)}, "not an AutoencoderKL"),
        ({"encoder.down_blocks.0.resnets.0.conv1.weight": (1,)}, "no post_quant_conv"),
    ],
)  # fmt: skip
def test_a_file_that_is_no_sd_vae_is_refused_by_name(
    tmp_path: Path, vae_keys: dict[str, tuple[int, ...]], message: str
) -> None:
    vae = _header_only(tmp_path / "odd-vae.safetensors", vae_keys)
    with pytest.raises(StageError, match=rf"vae '.*odd-vae\.safetensors'.*{message}"):
        resolve_model(str(_sdxl_file(tmp_path)), tmp_path, vae=str(vae))


def test_missing_and_pickled_vaes_are_refused(tmp_path: Path) -> None:
    model = str(_sdxl_file(tmp_path))
    with pytest.raises(StageError, match="does not exist"):
        resolve_model(model, tmp_path, vae=str(tmp_path / "gone.safetensors"))
    pickle = tmp_path / "vae.pt"
    pickle.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(StageError, match=r"vae '.*vae\.pt'.*never loaded"):
        resolve_model(model, tmp_path, vae=str(pickle))


def _other_vae(config_root: Path, folder: Path) -> Path:
    """A VAE with the model's config and different weights, saved the diffusers way."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(11)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_root / "sdxl" / "vae"))
    with torch.no_grad():
        for child in vae.modules():
            if isinstance(child, torch.nn.GroupNorm):
                child.weight.uniform_(0.5, 1.5)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_a_standalone_vae_swaps_in_as_diffusers_does(
    layout: str, miniatures: dict[str, Any], tmp_path: Path
) -> None:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from miniatures import fresh_memory, render, write_standalone_vae

    mini = miniatures["sdxl"]
    other = _other_vae(mini.config_root, tmp_path / "other-vae")
    vae_file = write_standalone_vae(other, tmp_path / f"vae-{layout}.safetensors", layout)
    plain = resolve_model(str(mini.checkpoint), tmp_path, config_root=mini.config_root)
    ref = resolve_model(
        str(mini.checkpoint), tmp_path, config_root=mini.config_root, vae=str(vae_file)
    )
    assert ref.vae == vae_file.resolve()
    assert ref.fingerprint != plain.fingerprint  # a warm pipeline is never mistaken for it
    pipe = load_pipeline(ref, "cpu", torch.float32)
    diffusers_vae = AutoencoderKL.from_pretrained(str(other), local_files_only=True)
    twin = StableDiffusionXLPipeline.from_pretrained(
        str(mini.twin), vae=diffusers_vae, local_files_only=True
    )
    twin.set_progress_bar_config(disable=True)
    ours, theirs = pipe.vae.state_dict(), twin.vae.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    np.testing.assert_array_equal(render(fresh_memory(pipe)), render(fresh_memory(twin)))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    own = AutoencoderKL.from_pretrained(str(mini.twin / "vae"), local_files_only=True)
    with torch.no_grad():
        assert not torch.allclose(pipe.vae.decode(latents).sample, own.decode(latents).sample)


@pytest.mark.slow
def test_a_vae_of_other_widths_does_not_fit(
    miniatures: dict[str, Any], models_dir: Path, tmp_path: Path
) -> None:
    import torch

    mini = miniatures["sdxl"]
    tiny_vae = models_dir / "tiny-sdxl" / "vae" / "diffusion_pytorch_model.safetensors"
    ref = resolve_model(
        str(mini.checkpoint), tmp_path, config_root=mini.config_root, vae=str(tiny_vae)
    )
    with pytest.raises(StageError, match=r"VAE diffusion_pytorch_model\.safetensors does not fit"):
        load_pipeline(ref, "cpu", torch.float32)
