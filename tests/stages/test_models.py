"""The tiny models, model references, pipeline loading and the warm pipeline cache."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from dropkiln.stages.base import StageError
from dropkiln.stages.models import (
    ModelRef,
    PipelineCache,
    ensure_tiny_model,
    load_pipeline,
    resolve_model,
    tiny_components,
    weights_checksum,
)

# Pinned: the tiny models must be byte-identical on every machine.
TINY_CHECKSUMS = {
    "tiny-sdxl": "8c587bcdeffc6178efe9fd5f013f88ca91f1bb963941ca0dd5a370bcd7278fa0",
    "tiny-sd15": "1019466389f958f863433367e93be16530c228af5cf0be3a995bf1526be67ca7",
}


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_tiny_weights_are_pinned(name: Any, models_dir: Path) -> None:
    assert weights_checksum(tiny_components(name)) == TINY_CHECKSUMS[name]
    recorded = json.loads((models_dir / name / "dropkiln-tiny.json").read_text())
    assert recorded["weights"] == TINY_CHECKSUMS[name]


def test_saved_weights_match_the_pinned_checksum(models_dir: Path) -> None:
    import torch

    pipe = load_pipeline(resolve_model("tiny-sdxl", models_dir), "cpu", torch.float32)
    assert weights_checksum(pipe.components) == TINY_CHECKSUMS["tiny-sdxl"]


def test_tiny_model_is_a_real_sdxl_layout(models_dir: Path) -> None:
    folder = models_dir / "tiny-sdxl"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert list((folder / part).glob("*.safetensors")), part
    assert not list(folder.rglob("*.bin"))
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4  # three downsamples: 8x


def test_build_is_atomic_and_reused(tmp_path: Path) -> None:
    first = ensure_tiny_model("tiny-sd15", tmp_path)
    stamp = (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = ensure_tiny_model("tiny-sd15", tmp_path)
    assert again == first
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd15"]  # no staging left over


def test_resolve_model_kinds_and_fingerprints(models_dir: Path) -> None:
    xl = resolve_model("tiny-sdxl", models_dir)
    sd = resolve_model("tiny-sd15", models_dir)
    assert (xl.kind, sd.kind) == ("sdxl", "sd15")
    assert xl.fingerprint != sd.fingerprint
    by_path = resolve_model(str(models_dir / "tiny-sdxl"), models_dir)
    assert by_path.fingerprint == xl.fingerprint
    assert by_path.kind == "sdxl"


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="unknown model 'sdxl-base'"):
        resolve_model("sdxl-base", tmp_path)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(StageError, match="never loaded"):
        resolve_model(str(pickle), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match=r"model_index\.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network is unavailable in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
def test_loads_and_generates_offline(models_dir: Path) -> None:
    import torch

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for name in ("tiny-sdxl", "tiny-sd15"):
        pipe = load_pipeline(resolve_model(name, models_dir), "cpu", torch.float32)
        out = pipe(
            "a photo of a cat",
            num_inference_steps=2,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        assert out.images.shape == (1, 64, 64, 3)
        if name == "tiny-sd15":
            assert pipe.safety_checker is None


class _FakePipeline:
    def __init__(self, nbytes: int) -> None:
        import torch

        self.components = {"unet": torch.nn.Linear(nbytes // 4, 1, bias=False)}


def test_warm_cache_does_not_reload(models_dir: Path) -> None:
    import torch

    cache = PipelineCache(ram_budget_bytes=1 << 30)
    ref = resolve_model("tiny-sd15", models_dir)
    first = cache.get(ref, "cpu", torch.float32)
    second = cache.get(ref, "cpu", torch.float32)
    assert first is second
    assert cache.loads == 1
    cache.get(ref, "cpu", torch.float64)
    assert cache.loads == 2  # dtype is part of the key


def test_warm_cache_evicts_least_recently_used() -> None:
    import torch

    loaded: list[str] = []

    def loader(ref: ModelRef, device: str, dtype: Any) -> Any:
        loaded.append(ref.name)
        return _FakePipeline(400)

    refs = [ModelRef(n, "sd15", Path(n), n * 8) for n in ("a", "b", "c")]
    cache = PipelineCache(ram_budget_bytes=900, loader=loader)
    cache.get(refs[0], "cpu", torch.float32)
    cache.get(refs[1], "cpu", torch.float32)
    cache.get(refs[0], "cpu", torch.float32)  # a is now the most recent
    cache.get(refs[2], "cpu", torch.float32)  # over budget: b goes
    assert loaded == ["a", "b", "c"]
    assert cache.evictions == 1
    cache.get(refs[0], "cpu", torch.float32)
    assert loaded == ["a", "b", "c"]
    cache.get(refs[1], "cpu", torch.float32)
    assert loaded == ["a", "b", "c", "b"]
    assert len(cache) == 2
    assert cache.resident_bytes <= 900


def test_a_pipeline_over_budget_is_kept_alone() -> None:
    import torch

    cache = PipelineCache(ram_budget_bytes=10, loader=lambda r, d, t: _FakePipeline(400))
    ref = ModelRef("big", "sd15", Path("big"), "f" * 16)
    cache.get(ref, "cpu", torch.float32)
    cache.get(ref, "cpu", torch.float32)
    assert cache.loads == 1


class _CyclicPipeline(_FakePipeline):
    """A pipeline whose parts refer to each other (as hooks and configs do): only the cyclic
    collector can free it."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.components["self"] = self  # type: ignore[assignment]


def test_a_warm_load_takes_the_long_lived_heap_out_of_full_collections() -> None:
    # Issue 16: with torch and diffusers loaded, a full (generation 2) collection walks
    # hundreds of thousands of objects, about 100 ms on an idle 2-core box, and it falls
    # wherever allocation triggers it: in the middle of a drop's pickup. After a load the
    # survivors (modules, the warm pipeline) are frozen, so later collections skip them;
    # an evicted pipeline is still freed.
    import gc
    import weakref

    import torch

    made: list[weakref.ref[Any]] = []

    def loader(ref: ModelRef, device: str, dtype: Any) -> Any:
        pipeline = _CyclicPipeline(400)
        made.append(weakref.ref(pipeline))
        return pipeline

    gc.unfreeze()
    try:
        cache = PipelineCache(ram_budget_bytes=500, loader=loader)
        refs = [ModelRef(n, "sd15", Path(n), n * 8) for n in ("a", "b")]
        cache.get(refs[0], "cpu", torch.float32)
        assert gc.get_freeze_count() > 0
        garbage = _CyclicPipeline(4)  # made after the load: not frozen, still collected
        dead = weakref.ref(garbage)
        del garbage
        gc.collect()
        assert dead() is None
        cache.get(refs[1], "cpu", torch.float32)  # over budget: a is evicted
        assert cache.evictions == 1
        assert made[0]() is None, "the evicted pipeline was kept alive by the freeze"
        assert made[1]() is not None
        cache.clear()
        assert made[1]() is None
    finally:
        gc.unfreeze()
