"""img2img and inpainting through the stage equal diffusers' own pipelines on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_generate import direct_pipeline, gen_root, local, one_thread, pixels, spec_for

from dropkiln.config import Settings
from dropkiln.stages.generate import run_generate
from dropkiln.stages.generation.png_files import read_dropkiln_record
from dropkiln.stages.generation.prompt_loading import load_prompt_file

torch = pytest.importorskip("torch")


__all__ = ["gen_root", "one_thread"]  # test_generate's fixtures


def write_inputs(folder: Path) -> None:
    """A 64x64 gradient to start from and a mask whose right half is repainted."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), 255 - ramp[None]
                    .repeat(64, 0)], axis=-1)  # fmt: skip
    Image.fromarray(rgb).save(folder / "start.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")


PROMPTS = """
[defaults]
steps = 4
width = 64
height = 64
[[image]]
prompt = "a sunset"
init_image = "start.png"
strength = 0.6
count = 2
[[image]]
prompt = "a sunset"
init_image = "start.png"
mask = "mask.png"
strength = 0.9
"""


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
def test_img2img_and_inpainting_match_the_diffusers_pipelines(
    gen_root: Path, models_dir: Path, tmp_path: Path, model: str
) -> None:
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        EulerDiscreteScheduler,
    )

    write_inputs(tmp_path)
    (tmp_path / "p.toml").write_text(PROMPTS)
    prompt_file = load_prompt_file(tmp_path / "p.toml", Settings(root=tmp_path).generate)
    result = run_generate(
        spec_for(tmp_path / "out", prompt_file, model=model), local(gen_root, tmp_path)
    )

    base = direct_pipeline(models_dir, model)
    start = Image.open(tmp_path / "start.png").convert("RGB")
    mask = Image.open(tmp_path / "mask.png").convert("L")
    common = {"prompt": "a sunset", "num_inference_steps": 4, "guidance_scale": 5.0}
    img2img = AutoPipelineForImage2Image.from_pipe(base)
    expected = []
    for seed in (1, 2):
        img2img.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
        generator = torch.Generator().manual_seed(seed)
        expected.append(img2img(image=start, strength=0.6, generator=generator, **common).images[0])
    inpaint = AutoPipelineForInpainting.from_pipe(base)
    inpaint.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    expected.append(
        inpaint(image=start, mask_image=mask, strength=0.9, width=64, height=64,
                generator=torch.Generator().manual_seed(1), **common).images[0]
    )  # fmt: skip

    for path, image in zip(result["images"], expected, strict=True):
        assert np.array_equal(pixels(path), np.asarray(image)), Path(path).name
    # the init image is used: not what text to image gives for the same prompt and seed
    plain = base(generator=torch.Generator().manual_seed(1), width=64, height=64, **common)
    assert not np.array_equal(pixels(result["images"][0]), np.asarray(plain.images[0]))
    record = read_dropkiln_record(Path(result["images"][2]))
    assert record is not None
    assert record["image"]["init_image"]["image"] == "start.png"
    assert record["image"]["mask"]["image"] == "mask.png"
    assert record["image"]["strength"] == 0.9
