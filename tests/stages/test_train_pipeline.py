"""cache → train end to end: offline, and proof that training on a dataset learns it."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from dataset_fixtures import FixtureImage, make_dataset, mixed_images

from dropkiln.config import TrainSettings
from dropkiln.stages import get_stage
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import CacheSpec
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import TrainSpec


def _cache_then_train(
    root: Path, name: str, model: str, options: TrainSettings, flip: bool = False
) -> tuple[Any, dict[str, Any], LocalContext]:
    manifest = root / "state" / "work" / name / "manifest.json"
    cache_ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / f"{name}-cache",
        upstream_results={"bucket": BucketResult.of(manifest)},
    )
    cached = get_stage("cache").run(CacheSpec(name=name, model=model, flip_augment=flip), cache_ctx)
    train_ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / f"{name}-train",
        upstream_results={"cache": cached},
    )
    spec = TrainSpec(
        name=name, model=model, options=options, output_dir=str(root / "outputs" / "loras" / name)
    )
    return cached, get_stage("train").run(spec, train_ctx), train_ctx


def test_whole_pipeline_runs_without_a_network(
    dropkiln_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network is unavailable in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_dataset(dropkiln_root, "cats", mixed_images(2))
    options = TrainSettings(steps=2, rank=2, shuffle_tags=True, validation_prompts=["sks cat"])
    cached, result, _ = _cache_then_train(dropkiln_root, "cats", "tiny-sd15", options, flip=True)
    assert cached.encoded == 2
    assert Path(result["lora"]).is_file()
    assert len(result["validation_images"]) == 1
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow
def test_training_on_a_flat_colour_learns_it(dropkiln_root: Path) -> None:
    """Loss falls, and generated latents move toward the dataset's cached latents."""
    import torch
    from safetensors.torch import load_file

    from dropkiln.stages.models import resolve_model, shared_pipelines

    images = [
        FixtureImage(f"red{n}", (220, 40, 40), "red", size=(64, 64), stripes=False)
        for n in range(2)
    ]
    make_dataset(dropkiln_root, "red", images)
    options = TrainSettings(
        steps=50,
        checkpoint_every=50,
        batch_size=2,
        rank=8,
        learning_rate=1e-2,
        # Convolutions too: the tiny UNet's random weights need more than attention to fit.
        target_modules=[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "conv1",
            "conv2",
            "conv_in",
            "conv_out",
        ],
    )
    cached, result, ctx = _cache_then_train(dropkiln_root, "red", "tiny-sdxl", options)

    losses = [metrics["loss"] for _, _, metrics in ctx.progress_log]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)

    index = json.loads(Path(cached.index).read_text())
    shards = Path(index["cache_dir"])
    target = torch.stack(
        [load_file(str(shards / e["latents"]["shard"]))["latents"] for e in index["images"]]
    ).mean(dim=0)
    pipe = shared_pipelines().get(
        resolve_model("tiny-sdxl", dropkiln_root / "state" / "models"), "cpu", torch.float32
    )

    def generated_latents() -> Any:
        return pipe(
            "red",
            width=64,
            height=64,
            num_inference_steps=10,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        ).images[0]

    untrained = ((generated_latents() - target) ** 2).mean().item()
    pipe.load_lora_weights(result["lora"], adapter_name="red")
    try:
        trained = ((generated_latents() - target) ** 2).mean().item()
    finally:
        pipe.unload_lora_weights()
    assert trained < 0.25 * untrained, (untrained, trained)
