"""The CUDA paths, on a real GPU (``pytest -m gpu``; skipped without CUDA).

Mixed precision (fp16 with GradScaler, bf16) and 8-bit AdamW resumed exactly; real CUDA
out-of-memory errors, forced with a per-process memory fraction, on every rung of the train
and generate ladders; one warm copy shared by train and generate, measured with
``torch.cuda.max_memory_allocated``; the offload rungs on a real device; device memory the
same at two dataset sizes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from dataset_fixtures import make_dataset, mixed_images

from dropkiln.config import TrainSettings
from dropkiln.stages.base import StageStopped
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import STAGE as CACHE
from dropkiln.stages.cache import CacheSpec
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import STAGE as TRAIN
from dropkiln.stages.train import TrainSpec, lora_path

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gpu") / "root"
    (root / "state").mkdir(parents=True)
    (root / "state" / "models").symlink_to(models_dir, target_is_directory=True)
    manifest = make_dataset(root, "cats", mixed_images(4))
    ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / "cache",
        device=DEVICE,
        upstream_results={"bucket": BucketResult.of(manifest)},
    )
    return {"root": root, "cache": CACHE.run(CacheSpec(name="cats"), ctx)}


def _train(cached: dict[str, Any], run: str, options: dict[str, Any], **ctx: Any) -> Any:
    root = cached["root"]
    spec = TrainSpec(
        name="cats",
        options=TrainSettings(**options),
        output_dir=str(root / "outputs" / "loras" / run),
    )
    context = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / run,
        device=DEVICE,
        upstream_results={"cache": cached["cache"]},
        **ctx,
    )
    return context, spec


def _tensors(spec: TrainSpec) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(lora_path(spec.output_dir, spec.name)))


def _resumed_equals_uninterrupted(cached: dict[str, Any], name: str, options: dict[str, Any]):
    ctx, spec = _train(cached, f"{name}-full", options)
    TRAIN.run(spec, ctx)
    full = _tensors(spec)
    ctx, spec = _train(cached, f"{name}-stopped", options, stop_after=2)
    with pytest.raises(StageStopped):
        TRAIN.run(spec, ctx)
    ctx.stop_after = None
    TRAIN.run(spec, ctx)
    resumed = _tensors(spec)
    assert [k for k in full if not full[k].equal(resumed[k])] == []


BASE = {"steps": 4, "checkpoint_every": 10, "rank": 2, "learning_rate": 1e-3, "batch_size": 2}


def test_fp16_with_grad_scaler_resumes_exactly(cached: dict[str, Any]) -> None:
    ctx, spec = _train(cached, "fp16-check", {**BASE, "mixed_precision": "fp16"})
    assert TRAIN.run(spec, ctx)["steps"] == 4
    _resumed_equals_uninterrupted(cached, "fp16", {**BASE, "mixed_precision": "fp16"})


def test_bf16_resumes_exactly(cached: dict[str, Any]) -> None:
    import torch

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    _resumed_equals_uninterrupted(cached, "bf16", {**BASE, "mixed_precision": "bf16"})


def test_adamw8bit_resumes_exactly(cached: dict[str, Any]) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install '.[cuda]')")
    _resumed_equals_uninterrupted(cached, "adamw8bit", {**BASE, "optimizer": "adamw8bit"})


@pytest.fixture
def starved() -> Any:
    """Cap this process's CUDA memory just above what is allocated now: the next real
    allocation of any size fails with the caching allocator's own OutOfMemoryError."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    fraction = (torch.cuda.memory_allocated() + 2 * 2**20) / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_real_oom_on_every_train_rung(cached: dict[str, Any], starved: None) -> None:
    import torch

    from dropkiln.stages.device import release_memory
    from dropkiln.stages.oom import is_out_of_memory

    for number, rung in enumerate(TRAIN.ladder):
        ctx, spec = _train(cached, f"oom-{rung.name}", BASE, memory_rung=number)
        with pytest.raises(Exception) as raised:
            TRAIN.run(spec, ctx)
        assert is_out_of_memory(raised.value), (rung.name, raised.value)
        assert isinstance(raised.value, torch.OutOfMemoryError | RuntimeError)
        del raised
        release_memory(DEVICE)


def test_real_oom_on_every_generate_rung(cached: dict[str, Any], starved: None) -> None:
    from dropkiln.stages.device import release_memory
    from dropkiln.stages.generate import STAGE as GENERATE
    from dropkiln.stages.generate import GenerateSpec
    from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile
    from dropkiln.stages.oom import is_out_of_memory

    prompts = PromptFile(images=[ImageEntry(prompt="a cat", steps=2, width=256, height=256)])
    root = cached["root"]
    for number, rung in enumerate(GENERATE.ladder):
        out = root / "outputs" / "images" / f"oom-{rung.name}"
        spec = GenerateSpec(name="oom", model="tiny-sdxl", prompt_file=prompts, output_dir=str(out))
        ctx = LocalContext(root=root, work_dir=out / "work", device=DEVICE, memory_rung=number)
        with pytest.raises(Exception) as raised:
            GENERATE.run(spec, ctx)
        assert is_out_of_memory(raised.value), (rung.name, raised.value)
        del raised
        release_memory(DEVICE)


def test_train_and_generate_share_one_warm_copy(cached: dict[str, Any]) -> None:
    import torch

    from dropkiln.stages.generate import STAGE as GENERATE
    from dropkiln.stages.generate import GenerateSpec
    from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile
    from dropkiln.stages.models import pipeline_bytes, resolve_model, shared_pipelines

    cache = shared_pipelines()
    cache.clear()
    torch.cuda.reset_peak_memory_stats()
    loads = cache.loads
    root = cached["root"]
    prompts = PromptFile(images=[ImageEntry(prompt="a cat", steps=2, width=64, height=64)])
    ctx, spec = _train(cached, "share-1", BASE)
    TRAIN.run(spec, ctx)
    out = root / "outputs" / "images" / "share"
    gen = GenerateSpec(name="share", model="tiny-sdxl", prompt_file=prompts, output_dir=str(out))
    GENERATE.run(gen, LocalContext(root=root, work_dir=out / "work", device=DEVICE))
    ctx, spec = _train(cached, "share-2", BASE)
    TRAIN.run(spec, ctx)
    assert cache.loads == loads + 1
    ref = resolve_model("tiny-sdxl", root / "state" / "models")
    weights = pipeline_bytes(cache.get(ref, DEVICE, _dtype()))
    peak = torch.cuda.max_memory_allocated()
    print(f"weights {weights} B, peak {peak} B over train → generate → train")
    assert peak < 2 * weights + 512 * 2**20  # one copy plus the working set, never two


def _dtype() -> Any:
    from dropkiln.stages.generation.render import inference_dtype

    return inference_dtype(DEVICE)


@pytest.mark.parametrize("rung", ["model-cpu-offload", "sequential-cpu-offload"])
def test_offload_rungs_on_a_real_device(cached: dict[str, Any], rung: str) -> None:
    from dropkiln.stages.generate import STAGE as GENERATE
    from dropkiln.stages.generate import GenerateSpec
    from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile

    number = [r.name for r in GENERATE.ladder].index(rung)
    prompts = PromptFile(images=[ImageEntry(prompt="a cat", steps=2, width=64, height=64)])
    out = cached["root"] / "outputs" / "images" / rung
    spec = GenerateSpec(name="off", model="tiny-sdxl", prompt_file=prompts, output_dir=str(out))
    ctx = LocalContext(root=cached["root"], work_dir=out / "w", device=DEVICE, memory_rung=number)
    result = GENERATE.run(spec, ctx)
    assert len(result["images"]) == 1 and Path(result["images"][0]).is_file()


def test_vae_and_text_encoders_leave_the_device_while_stepping(cached: dict[str, Any]) -> None:
    """A training step finds the VAE and text encoders in RAM; validation images find them
    back on the GPU; the warm pipeline is handed back whole. Then device memory during the
    steps is the UNet's weights plus the working set."""
    import torch

    from dropkiln.stages.models import resolve_model, shared_pipelines

    ref = resolve_model("tiny-sdxl", cached["root"] / "state" / "models")
    pipe = shared_pipelines().get(ref, DEVICE, _dtype())
    seen: dict[str, set[str]] = {"step": set(), "sample": set()}

    def where() -> str:
        return f"{pipe.vae.device.type}/{pipe.text_encoder.device.type}"

    def in_unet(_module: Any, _args: Any) -> None:
        if torch.is_grad_enabled():
            seen["step"].add(where())

    def in_decoder(_module: Any, _args: Any) -> None:
        seen["sample"].add(where())

    hooks = [pipe.unet.register_forward_pre_hook(in_unet),
             pipe.vae.decoder.register_forward_pre_hook(in_decoder)]  # fmt: skip
    try:
        options = {**BASE, "checkpoint_every": 2, "validation_prompts": ["a cat"]}
        ctx, spec = _train(cached, "phases", options)
        TRAIN.run(spec, ctx)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"step": {"cpu/cpu"}, "sample": {"cuda/cuda"}}
    assert where() == "cuda/cuda"


def test_device_memory_does_not_grow_with_the_dataset(cached: dict[str, Any]) -> None:
    """Two datasets, 2 and 12 images: a training run's peak device memory is the same, since
    latents and text embeddings stream from the shards through the bounded prefetch."""
    import torch

    from dropkiln.stages.cache import CacheIndex, CacheResult

    root = cached["root"]
    peaks, shard_bytes = {}, {}
    for count in (2, 12):
        name = f"size{count}"
        manifest = make_dataset(root, name, mixed_images(count))
        work = root / "state" / "work" / f"cache-{name}"
        result = CACHE.run(CacheSpec(name=name), LocalContext(root=root, work_dir=work,
                           device=DEVICE,
                           upstream_results={"bucket": BucketResult.of(manifest)}))  # fmt: skip
        assert isinstance(result, CacheResult)
        index = CacheIndex.load(result.index)
        refs = {i.latents for i in index.images} | {i.text for i in index.images}
        shard_bytes[count] = sum((Path(index.cache_dir) / r.shard).stat().st_size for r in refs)
        sized = {"root": root, "cache": result}
        ctx, spec = _train(sized, f"{name}-warm", {**BASE, "steps": 1})
        TRAIN.run(spec, ctx)  # the model warm and the allocator's first blocks made
        torch.cuda.reset_peak_memory_stats()
        ctx, spec = _train(sized, name, BASE)
        TRAIN.run(spec, ctx)
        peaks[count] = torch.cuda.max_memory_allocated()
    print(f"peak device memory {peaks}, shard bytes {shard_bytes}, by dataset size")
    # Were the dataset held on the device, the ten more images would add their shards' bytes.
    assert abs(peaks[12] - peaks[2]) < (shard_bytes[12] - shard_bytes[2]) / 2, peaks
