"""A warm pipeline after an offloading job renders exactly as a freshly loaded one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_generate import direct_pipeline, entries, gen_root, local, one_thread, pixels, spec_for

from dropkiln.stages.generate import run_generate
from dropkiln.stages.generation.memory_ladder import GENERATE_LADDER

torch = pytest.importorskip("torch")

__all__ = ["gen_root", "one_thread"]  # test_generate's fixtures

OFFLOAD_RUNGS = [n for n, rung in enumerate(GENERATE_LADDER) if rung.options.get("offload")]


@pytest.mark.parametrize("rung", OFFLOAD_RUNGS)
def test_after_an_offload_rung_the_warm_pipeline_renders_as_a_fresh_load(
    gen_root: Path, models_dir: Path, tmp_path: Path, rung: int
) -> None:
    from dropkiln.stages.models import shared_pipelines

    shared_pipelines().clear()  # a warm pipeline that has only ever run at the top rung
    prompt_file = entries("a red fox", seed=3)
    run_generate(
        spec_for(tmp_path / "offloaded", prompt_file), local(gen_root, tmp_path, memory_rung=rung)
    )
    after = run_generate(spec_for(tmp_path / "after", prompt_file), local(gen_root, tmp_path))

    direct = direct_pipeline(models_dir, "tiny-sdxl")(
        prompt="a red fox",
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    assert np.array_equal(pixels(after["images"][0]), np.asarray(direct))


def test_after_model_offload_a_warm_img2img_renders_as_a_fresh_diffusers_load(
    models_dir: Path,
) -> None:
    """Issue 12: diffusers hooks a CPU offload on ``cpu:0`` (again after every call), which
    accelerate takes for another device than ``cpu``, so it copies each component's weights
    at each call; the copies lie at other memory alignments than the loaded weights, and the
    CPU matmul kernels round some values differently there (one pixel level), which img2img
    showed and text to image hid."""
    from diffusers import AutoPipelineForImage2Image, StableDiffusionXLPipeline
    from PIL import Image

    from dropkiln.stages.generation.memory_ladder import apply_rung, undo_rung

    def load(cls: Any) -> Any:
        pipe = cls.from_pretrained(
            models_dir / "tiny-sdxl", torch_dtype=torch.float32, use_safetensors=True
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def img2img(pipe: Any) -> Any:
        ramp = np.linspace(0, 255, 64, dtype=np.uint8)
        start = Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1))
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            prompt="a sunset", image=start, strength=0.6, num_inference_steps=3,
            guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
        ).images[0]  # fmt: skip
        return np.asarray(image)

    warm = load(StableDiffusionXLPipeline)
    options = next(r.options for r in GENERATE_LADDER if r.options.get("offload") == "model")
    apply_rung(warm, options, "cpu")
    for _ in range(2):  # the offloaded job: one image a call
        warm(prompt="a red fox", num_inference_steps=1, width=64, height=64)
    undo_rung(warm, options, "cpu")

    expected = img2img(load(AutoPipelineForImage2Image))
    assert np.array_equal(img2img(AutoPipelineForImage2Image.from_pipe(warm)), expected)


@pytest.mark.parametrize(
    ("weights", "wanted", "current", "same"),
    [
        ("cuda:0", "cuda", 0, True),  # torch names a weight's card; settings may not
        ("cuda:1", "cuda", 0, False),
        ("cuda:1", "cuda", 1, True),
        ("cuda:0", "cuda:0", 0, True),
        ("cuda:0", "cuda:1", 0, False),
        ("cpu", "cpu", 0, True),
        ("cpu", "cuda", 0, False),
    ],
)
def test_weights_on_the_card_an_unnumbered_cuda_names_count_as_in_place(
    monkeypatch: pytest.MonkeyPatch, weights: str, wanted: str, current: int, same: bool
) -> None:
    """torch puts weights on "cuda:N" and reports them so; "cuda" means the current card.
    Compared as plain devices they differed, so every job on a GPU moved the pipeline again."""
    from dropkiln.stages.generation.memory_ladder import on_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    assert on_device(torch.device(weights), torch.device(wanted)) is same
