"""A LoRA trained by the train stage, in both of its formats, used by the generate stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dataset_fixtures import make_dataset, mixed_images
from PIL import Image

from dropkiln.config import TrainSettings
from dropkiln.stages import get_stage
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import CacheSpec
from dropkiln.stages.generate import GenerateSpec, LoraFile, run_generate
from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import TrainSpec


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
def test_kohya_and_diffusers_files_of_a_trained_lora_give_the_same_image(
    dropkiln_root: Path, model: str
) -> None:
    root = dropkiln_root
    manifest = make_dataset(root, "cats", mixed_images(2))
    cached = get_stage("cache").run(
        CacheSpec(name="cats", model=model),
        LocalContext(root=root, work_dir=root / "state" / "work" / "cache",
                     upstream_results={"bucket": BucketResult.of(manifest)}),
    )  # fmt: skip
    options = TrainSettings(steps=2, rank=4, learning_rate=5e-2, train_text_encoder=True)
    spec = TrainSpec(name="cats", model=model, options=options,
                     output_dir=str(root / "outputs" / "loras" / "cats"))  # fmt: skip
    trained = get_stage("train").run(
        spec,
        LocalContext(root=root, work_dir=root / "state" / "work" / "train",
                     upstream_results={"cache": cached}),
    )  # fmt: skip

    prompt_file = PromptFile(
        images=[ImageEntry(prompt="sks cat", seed=4, steps=3, width=64, height=64)]
    )

    def generate(out: str, loras: list[LoraFile]) -> Any:
        spec = GenerateSpec(name=out, model=model, prompt_file=prompt_file, loras=loras,
                            output_dir=str(root / "outputs" / "images" / out))  # fmt: skip
        ctx = LocalContext(root=root, work_dir=root / "state" / "work" / out)
        return run_generate(spec, ctx)["images"][0]

    kohya = generate("kohya", [LoraFile(name="cats", path=trained["lora"], weight=1.0)])
    peft = generate("peft", [LoraFile(name="cats", path=trained["diffusers_lora"], weight=1.0)])
    plain = generate("plain", [])
    assert not np.array_equal(pixels(kohya), pixels(plain))
    assert np.abs(pixels(kohya).astype(int) - pixels(peft).astype(int)).max() <= 1
