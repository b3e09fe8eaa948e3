"""One warm copy per (model, device): training, caching and generation ask for the same
weights dtype; the device-memory budget; OOM eviction of the other warm pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropkiln.config import TrainSettings
from dropkiln.stages.models import ModelRef, PipelineCache


class _FakePipeline:
    def __init__(self, nbytes: int) -> None:
        import torch

        self.components = {"unet": torch.nn.Linear(nbytes // 4, 1, bias=False)}


@pytest.mark.parametrize("bf16", [True, False])
def test_train_and_generate_ask_for_one_dtype_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, bf16: bool
) -> None:
    """On a GPU the train stage (mixed_precision auto) and the generate stage used to load
    the model in bf16 and fp16: two warm copies of SDXL. Both now take the device's one."""
    import torch

    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.train import STAGE, _plan

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    plan = _plan(TrainSettings(), STAGE.rung(0).options, "cuda:0")
    assert plan.weight_dtype == inference_dtype("cuda:0")
    assert plan.weight_dtype == (torch.bfloat16 if bf16 else torch.float16)
    assert plan.fp16 == (not bf16)  # fp16 training keeps its GradScaler
    assert inference_dtype("cpu") == _plan(TrainSettings(), {}, "cpu").weight_dtype


def test_train_generate_train_loads_the_model_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The warm cache's load counter across train → generate → train on a (faked) GPU."""
    import torch

    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.train import STAGE, _plan

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cache = PipelineCache(device_budget_bytes=1 << 30, loader=lambda r, d, t: _FakePipeline(64))
    ref = ModelRef("sdxl", "sdxl", Path("sdxl"), "f" * 16)
    train_dtype = _plan(TrainSettings(), STAGE.rung(0).options, "cuda:0").weight_dtype
    first = cache.get(ref, "cuda:0", train_dtype)
    assert cache.get(ref, "cuda:0", inference_dtype("cuda:0")) is first
    assert cache.get(ref, "cuda:0", train_dtype) is first
    assert cache.loads == 1 and len(cache) == 1


def test_device_budget_counts_gpu_pipelines_apart_from_ram() -> None:
    import torch

    cache = PipelineCache(
        ram_budget_bytes=1 << 30, device_budget_bytes=900, loader=lambda r, d, t: _FakePipeline(400)
    )
    refs = [ModelRef(n, "sd15", Path(n), n * 8) for n in ("a", "b", "c")]
    for ref in refs:
        cache.get(ref, "cuda:0", torch.float16)
    assert cache.device_bytes("cuda:0") <= 900 and cache.evictions == 1
    assert cache.resident_bytes == 0  # nothing in RAM
    cache.get(refs[0], "cpu", torch.float32)
    assert cache.resident_bytes == 400 and cache.evictions == 1


def test_oom_evicts_the_other_gpu_pipelines_and_names_them() -> None:
    import torch

    cache = PipelineCache(device_budget_bytes=1 << 30, loader=lambda r, d, t: _FakePipeline(64))
    refs = [ModelRef(n, "sd15", Path(n), n * 8) for n in ("a", "b", "c")]
    for ref in refs:
        cache.get(ref, "cuda:0", torch.float16)
    cache.get(refs[0], "cpu", torch.float32)
    cache.get(refs[1], "cuda:0", torch.float16)  # the job that runs out of memory uses b
    assert cache.evict_all_but_newest("cpu") == []
    assert cache.evict_all_but_newest("cuda:0") == [
        "a on cuda:0 (float16)",
        "c on cuda:0 (float16)",
    ]
    assert len(cache) == 2 and cache.loads == 4
    assert cache.get(refs[1], "cuda:0", torch.float16) is not None and cache.loads == 4


def test_out_of_memory_event_records_the_evicted_pipelines() -> None:
    from dropkiln.store.events import OutOfMemory

    plain = OutOfMemory(memory_rung=1, rung_name="x", snapshot={}, message="m")
    assert plain.evicted == []
    freed = plain.model_copy(update={"evicted": ["a on cuda:0 (float16)"]})
    assert OutOfMemory.model_validate_json(freed.model_dump_json()).evicted == freed.evicted
