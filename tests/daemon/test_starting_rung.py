"""The first memory rung of a GPU job: the estimate from device memory, the remembered
rung, the re-probe one rung up, and the reason JobStarted records. Device facts are faked
(the memory probe is monkeypatched), so nothing here needs a GPU or runs a model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

import dropkiln.daemon.placement as placement_module
import dropkiln.stages.models as models_module
from dropkiln.config import Settings
from dropkiln.daemon.executor import Executor
from dropkiln.stages import get_stage
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.starting_rung import GIB, training_start_rung
from dropkiln.stages.train import STAGE as TRAIN
from dropkiln.store import EventStore, find_job
from dropkiln.store import events as ev
from dropkiln.store.backend import open_store
from dropkiln.store.events import job_stream
from dropkiln.store.leases import executor_id

LADDER = TRAIN.ladder
MODEL = "sdxl-base.safetensors"
KEY = f"train:{MODEL}:1024"
# What torch.cuda.mem_get_info reports free on an idle card of each size (the CUDA
# context and the driver take a few hundred MiB).
FREE_24GB = int(23.4 * GIB)
FREE_12GB = int(11.4 * GIB)
FREE_8GB = int(7.4 * GIB)


def sdxl_rung(free: int, *, resolution: int = 1024, batch: int = 1, rank: int = 16) -> int | None:
    return training_start_rung(LADDER, "sdxl", resolution, batch, rank, "adamw", free)


def test_a_24gb_card_starts_sdxl_1024_rank_16_at_the_default_rung() -> None:
    assert sdxl_rung(FREE_24GB) == 0


def test_smaller_cards_start_lower() -> None:
    # 12 GB: gradient checkpointing is enough for one image at 1024.
    assert LADDER[sdxl_rung(FREE_12GB) or 0].name == "gradient-checkpointing"
    # 8 GB: nothing is estimated to fit, so the safest rung, not an OOM first.
    assert sdxl_rung(FREE_8GB) == len(LADDER) - 1


def test_batch_and_resolution_move_the_rung() -> None:
    # Batch 4 at 1024 on 24 GB: only with checkpointing; 512 at batch 1: the default.
    assert LADDER[sdxl_rung(FREE_24GB, batch=4) or 0].name == "gradient-checkpointing"
    assert sdxl_rung(FREE_12GB, resolution=512) == 0
    # SD 1.5 at its own resolution fits an 8 GB card without help.
    assert training_start_rung(LADDER, "sd15", 512, 1, 16, "adamw", FREE_8GB) == 0


def test_no_estimate_for_an_unknown_family() -> None:
    assert training_start_rung(LADDER, None, 1024, 1, 16, "adamw", FREE_8GB) is None


class FakeDeviceThread:
    """Runs device calls inline; the executor only reads ``device`` and calls ``run``."""

    def __init__(self, device: str) -> None:
        self.device = device

    async def run(self, fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        return fn(*args)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    opened = await open_store(tmp_path / "state" / "dropkiln.db", create=True)
    try:
        yield opened
    finally:
        await opened.close()


def executor(tmp_path: Path, store: EventStore, device: str, reprobe_after: int = 5) -> Executor:
    settings = Settings(root=tmp_path, memory={"reprobe_after": reprobe_after})
    thread = cast(Any, FakeDeviceThread(device))
    return Executor(settings, store, thread, FaultInjector(), executor_id(device))


@pytest.fixture
def free_memory(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Fake the device: ``free_memory(bytes)`` sets what the memory probe reports, and
    the model resolves as an SDXL checkpoint without a file."""
    monkeypatch.setattr(
        models_module, "resolve_model", lambda *a, **k: SimpleNamespace(kind="sdxl")
    )

    def set_free(free: int) -> None:
        monkeypatch.setattr(placement_module, "memory_snapshot", lambda device: {"free": free})

    return set_free


async def submit(store: EventStore, job_id: str) -> None:
    spec = {"name": "cats", "model": MODEL, "output_dir": "/out/cats"}
    submitted = ev.JobSubmitted(
        job_id=job_id,
        stage="train",
        name="cats",
        lane="gpu",
        priority=0,
        spec=spec,
        rung_key=KEY,
    )
    await store.append(job_stream(job_id), [submitted, ev.JobQueued()])


async def run_clean(store: EventStore, job_id: str, rung: int) -> None:
    await submit(store, job_id)
    started = ev.JobStarted(attempt=1, memory_rung=rung)
    await store.append(job_stream(job_id), [started, ev.JobSucceeded()])


async def start(ex: Executor, store: EventStore, job_id: str) -> tuple[int, str]:
    return await ex.starting_rung(await find_job(store, job_id), get_stage("train"))


async def test_the_estimate_starts_a_first_job(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = executor(tmp_path, store, "cuda")
    await submit(store, "first")
    free_memory(FREE_24GB)
    assert await start(ex, store, "first") == (0, "estimate")
    free_memory(FREE_8GB)
    assert await start(ex, store, "first") == (len(LADDER) - 1, "estimate")


async def test_a_remembered_lower_rung_wins(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = executor(tmp_path, store, "cuda")
    free_memory(FREE_24GB)
    await run_clean(store, "earlier", 2)
    await submit(store, "next")
    assert await start(ex, store, "next") == (2, "remembered")
    # A safer estimate (the card is busier now) wins over a remembered default.
    await run_clean(store, "later", 0)
    free_memory(FREE_12GB)
    assert await start(ex, store, "next") == (1, "estimate")


async def test_after_n_clean_runs_one_rung_up_is_tried_and_an_oom_there_is_remembered(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = executor(tmp_path, store, "cuda", reprobe_after=3)
    free_memory(FREE_24GB)
    for n in range(2):
        await run_clean(store, f"clean{n}", 2)
    await submit(store, "probe")
    assert await start(ex, store, "probe") == (2, "remembered")
    await run_clean(store, "clean2", 2)
    assert await start(ex, store, "probe") == (1, "re-probe")
    # The re-probe runs out of memory: the ladder steps back down and the job is retried
    # (and succeeds) at the remembered rung.
    oom = ev.OutOfMemory(memory_rung=1, rung_name=LADDER[1].name, snapshot={}, message="OOM")
    retry = ev.RetryScheduled(next_rung=2, rung_name=LADDER[2].name)
    await store.append(job_stream("probe"), [ev.JobStarted(attempt=1, memory_rung=1), oom, retry])
    assert await start(ex, store, "probe") == (2, "retry")
    await store.append(
        job_stream("probe"), [ev.JobStarted(attempt=2, memory_rung=2), ev.JobSucceeded()]
    )
    # Rung 2 is remembered, and the failed probe restarts the count of clean runs.
    await submit(store, "after")
    assert await start(ex, store, "after") == (2, "remembered")


async def test_a_successful_re_probe_is_remembered(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = executor(tmp_path, store, "cuda", reprobe_after=1)
    free_memory(FREE_24GB)
    await run_clean(store, "busy", 2)
    await submit(store, "probe")
    assert await start(ex, store, "probe") == (1, "re-probe")
    await store.append(
        job_stream("probe"), [ev.JobStarted(attempt=1, memory_rung=1), ev.JobSucceeded()]
    )
    await submit(store, "after")
    assert await start(ex, store, "after") == (0, "re-probe")


async def test_the_cpu_starts_where_it_always_did(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = executor(tmp_path, store, "cpu", reprobe_after=0)
    free_memory(0)  # an estimate would pick the bottom rung; the CPU never asks for one
    await submit(store, "cpu")
    assert await start(ex, store, "cpu") == (0, "default")
    await run_clean(store, "oomed-before", 3)
    assert await start(ex, store, "cpu") == (3, "remembered")


def test_old_job_started_rows_still_read() -> None:
    old = ev.JobStarted.model_validate({"attempt": 1, "memory_rung": 0, "rung_name": "default"})
    assert old.rung_reason is None


# Generate jobs: the same start from device facts, per family, image size and batch.

GENERATE = get_stage("generate")


def generate_spec(model: str, side: int = 1024, batch: int | None = None) -> dict[str, Any]:
    image = {"prompt": "a cat", "width": side, "height": side, "batch_size": batch}
    return {"name": "cats", "model": model, "output_dir": "/out/cats",
            "prompt_file": {"images": [image]}}  # fmt: skip


def generate_rung(free: int, family: str = "sdxl", **spec: Any) -> str | None:
    from dropkiln.stages.starting_rung import StartFacts

    parsed = GENERATE.spec.model_validate(generate_spec("real.safetensors", **spec))
    assert GENERATE.start_rung is not None
    models = SimpleNamespace(kind=family)
    original = models_module.resolve_model
    models_module.resolve_model = lambda *a, **k: models  # type: ignore[assignment]
    try:
        rung = GENERATE.start_rung(parsed, StartFacts("/root", None, free))
    finally:
        models_module.resolve_model = original
    return None if rung is None else GENERATE.ladder[rung].name


def test_generate_sdxl_at_1024_starts_by_card_size() -> None:
    # The GPU's default batch of four images a call.
    assert generate_rung(FREE_24GB) == "default"
    assert generate_rung(FREE_12GB) == "attention-vae-slicing"
    assert generate_rung(FREE_8GB) == "sequential-cpu-offload"


def test_generate_batch_size_and_image_size_move_the_rung() -> None:
    assert generate_rung(FREE_12GB, batch=1) == "default"
    assert generate_rung(FREE_8GB, side=768) == "model-cpu-offload"
    assert generate_rung(FREE_24GB, side=2048) != "default"
    # SD 1.5 at its own size fits an 8 GB card as it is.
    assert generate_rung(FREE_8GB, family="sd15", side=512) == "default"


def test_no_generate_estimate_for_the_tiny_models() -> None:
    from dropkiln.stages.starting_rung import StartFacts

    parsed = GENERATE.spec.model_validate(generate_spec("tiny-sdxl"))
    assert GENERATE.start_rung is not None
    assert GENERATE.start_rung(parsed, StartFacts("/root", None, FREE_8GB)) is None


async def test_a_first_generate_job_starts_at_its_estimate(
    tmp_path: Path, store: EventStore, free_memory: Callable[[int], None]
) -> None:
    ex = executor(tmp_path, store, "cuda")
    submitted = ev.JobSubmitted(
        job_id="render", stage="generate", name="cats", lane="gpu", priority=10,
        spec=generate_spec(MODEL), rung_key=f"generate:{MODEL}:1024x1024",
    )  # fmt: skip
    await store.append(job_stream("render"), [submitted, ev.JobQueued()])
    free_memory(FREE_12GB)
    job = await find_job(store, "render")
    assert await ex.starting_rung(job, GENERATE) == (1, "estimate")
