"""Two LoRAs at once, each with its own weight, against diffusers' own ``set_adapters``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_generate import (
    direct_pipeline,
    entries,
    gen_root,
    local,
    lora_file,
    one_thread,
    pixels,
    spec_for,
)

from dropkiln.stages.generate import LoraFile, run_generate
from dropkiln.stages.generation.png_files import read_png_text

torch = pytest.importorskip("torch")


__all__ = ["gen_root", "lora_file", "one_thread"]  # test_generate's fixtures


@pytest.fixture(scope="session")
def second_lora(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another diffusers-format LoRA for tiny-sdxl, on other layers and from another seed."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(models_dir / "tiny-sdxl", subfolder="unet")
    config = LoraConfig(
        r=2, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_out.0"]
    )
    unet.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora-2")
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    (path,) = folder.glob("*.safetensors")
    return path


@pytest.mark.slow
# peft warns whenever a second adapter joins a model: here that is the point
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_two_loras_with_weights_match_diffusers_set_adapters(
    gen_root: Path, models_dir: Path, tmp_path: Path, lora_file: Path, second_lora: Path
) -> None:
    prompt_file = entries("a cat", seed=2, steps=3)
    loras = [
        LoraFile(name="cats", path=str(lora_file), weight=0.7),
        LoraFile(name="style", path=str(second_lora), weight=-0.4),
    ]
    both = run_generate(
        spec_for(tmp_path / "both", prompt_file, loras=loras), local(gen_root, tmp_path)
    )
    first = run_generate(
        spec_for(tmp_path / "first", prompt_file, loras=loras[:1]), local(gen_root, tmp_path)
    )

    pipe = direct_pipeline(models_dir, "tiny-sdxl")
    kwargs = dict(prompt="a cat", num_inference_steps=3, guidance_scale=5.0, width=64, height=64)
    for name, path in (("a", lora_file), ("b", second_lora)):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    try:
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
        stacked = pipe(generator=torch.Generator().manual_seed(2), **kwargs).images[0]
    finally:
        pipe.unload_lora_weights()

    assert np.array_equal(pixels(both["images"][0]), np.asarray(stacked))
    assert not np.array_equal(pixels(both["images"][0]), pixels(first["images"][0]))
    parameters = read_png_text(Path(both["images"][0]))["parameters"]
    assert parameters.startswith("a cat <lora:cats:0.7> <lora:style:-0.4>")
    hashes = [record["sha256"][:12] for record in both["loras"]]
    assert f'Lora hashes: "cats: {hashes[0]}, style: {hashes[1]}"' in parameters
