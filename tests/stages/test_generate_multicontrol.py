"""Several ControlNets at once, each with its image, weight and start/end, against diffusers'
multi-ControlNet pipeline; and the canny preprocessor against OpenCV's own Canny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_generate import gen_root, local, one_thread, pixels, spec_for

from dropkiln.config import Settings
from dropkiln.stages.generate import run_generate
from dropkiln.stages.generation.controlnet import ensure_tiny_controlnet
from dropkiln.stages.generation.prompt_loading import load_prompt_file

torch = pytest.importorskip("torch")


__all__ = ["gen_root", "one_thread"]  # test_generate's fixtures

TWO_CONTROLS = """\
[defaults]
steps = 4
width = 64
height = 64
[[image]]
prompt = "a cat"
control = [
  { image = "pose.png", scale = 0.9, end = 0.5 },
  { image = "photo.png", scale = 0.6, start = 0.25, preprocess = "canny" },
]
[[image]]
prompt = "a cat"
control = { image = "pose.png", scale = 0.9, end = 0.5 }
"""


def write_controls(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pose = np.zeros((64, 64, 3), np.uint8)
    pose[10:54, 20:44] = 255
    Image.fromarray(pose).save(folder / "pose.png")
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[8:40, 8:56] = (200, 120, 40)
    photo[30:60, 30:50] = (20, 60, 220)
    Image.fromarray(photo).save(folder / "photo.png")


def opencv_canny(path: Path) -> Image.Image:
    import cv2

    gray = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)
    edges = cv2.Canny(gray, 100, 200)
    return Image.fromarray(cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
def test_two_controlnets_match_the_diffusers_multi_controlnet_pipeline(
    gen_root: Path, models_dir: Path, tmp_path: Path, model: str
) -> None:
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    from dropkiln.stages.models import load_pipeline, resolve_model

    folder = tmp_path / "drop"
    write_controls(folder)
    (folder / "p.toml").write_text(TWO_CONTROLS)
    prompt_file = load_prompt_file(folder / "p.toml", Settings(root=gen_root).generate)
    result = run_generate(
        spec_for(tmp_path / "out", prompt_file, model=model), local(gen_root, tmp_path)
    )
    both, pose_only = (pixels(path) for path in result["images"])
    assert not np.array_equal(both, pose_only)

    ref = resolve_model(model, models_dir)
    controlnet = ControlNetModel.from_pretrained(ensure_tiny_controlnet(ref, models_dir))
    cls = (
        StableDiffusionXLControlNetPipeline
        if ref.kind == "sdxl"
        else StableDiffusionControlNetPipeline
    )
    base = load_pipeline(ref, "cpu", torch.float32)
    pipe = cls.from_pipe(base, controlnet=[controlnet, controlnet])
    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    with Image.open(folder / "pose.png") as pose:
        direct = pipe(
            prompt="a cat",
            image=[pose.convert("RGB"), opencv_canny(folder / "photo.png")],
            controlnet_conditioning_scale=[0.9, 0.6],
            control_guidance_start=[0.0, 0.25],
            control_guidance_end=[0.5, 1.0],
            num_inference_steps=4,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(1),
        ).images[0]
    assert np.array_equal(both, np.asarray(direct))
    parameters = Image.open(result["images"][0]).text["parameters"]  # type: ignore[attr-defined]
    assert "ControlNet 0: " in parameters and "ControlNet 1: " in parameters


def test_canny_preprocessor_is_opencv_canny(tmp_path: Path) -> None:
    from dropkiln.stages.generation.controlnet import control_image
    from dropkiln.stages.generation.prompt_file import ControlRef

    write_controls(tmp_path)
    control = ControlRef(image=str(tmp_path / "photo.png"), preprocess="canny")
    edges = np.asarray(control_image(control, "image[0]"))
    assert np.array_equal(edges, np.asarray(opencv_canny(tmp_path / "photo.png")))
    assert set(np.unique(edges)) == {0, 255}


def test_the_tiny_controlnet_fits_a_model_whose_vae_halves_twice(
    gen_root: Path, tmp_path: Path
) -> None:
    """tiny-shapes' VAE brings 64 px to 16 latents (two halvings, not three): the tiny
    ControlNet's control-image embedding must come down to the same size."""
    from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile

    write_controls(tmp_path / "drop")
    control = {"image": str(tmp_path / "drop" / "pose.png"), "scale": 1.0}
    prompt_file = PromptFile(
        images=[ImageEntry(prompt="a star", steps=2, width=64, height=64, control=[control])]
    )
    spec = spec_for(tmp_path / "out", prompt_file, model="tiny-shapes")
    result = run_generate(spec, local(gen_root, tmp_path))
    assert pixels(result["images"][0]).shape == (64, 64, 3)
