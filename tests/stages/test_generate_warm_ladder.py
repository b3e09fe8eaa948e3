"""A warm pipeline after an offloading job renders exactly as a freshly loaded one."""

from __future__ import annotations

from pathlib import Path

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
