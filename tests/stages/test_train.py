"""The train stage: outputs, exact resume (stop, OOM), ladder, warm pipeline hygiene."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from dataset_fixtures import make_dataset, mixed_images

from dropkiln.config import TrainSettings
from dropkiln.stages.base import StageError, StageStopped
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import STAGE as CACHE
from dropkiln.stages.cache import CacheSpec
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import STAGE, TrainSpec, lora_path
from dropkiln.stages.training.exports import step_lora_path

# Every option that draws randomness or keeps state, so exact resume covers them all.
RICH = {
    "steps": 6,
    "checkpoint_every": 4,
    "batch_size": 2,
    "gradient_accumulation": 2,
    "rank": 4,
    "alpha": 2.0,
    "learning_rate": 5e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 2,
    "ema_decay": 0.9,
    "flip_augment": True,
    "shuffle_tags": True,
    "keep_tokens": 1,
    "tag_dropout": 0.3,
    "caption_dropout": 0.2,
    "noise_offset": 0.05,
    "input_perturbation": 0.1,
    "min_snr_gamma": 5.0,
    "timestep_min": 10,
    "timestep_max": 900,
    "tag_weights": {"red hair": 2.0},
}


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Any]:
    """A ROOT with a 4-image dataset cached for tiny-sdxl (with flips)."""
    root = tmp_path_factory.mktemp("train") / "root"
    (root / "state").mkdir(parents=True)
    (root / "state" / "models").symlink_to(models_dir, target_is_directory=True)
    manifest = make_dataset(root, "cats", mixed_images(4))
    ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / "cache",
        upstream_results={"bucket": BucketResult.of(manifest)},
    )
    result = CACHE.run(CacheSpec(name="cats", flip_augment=True), ctx)
    return {"root": root, "cache": result}


def _train(
    cached: dict[str, Any], run: str, options: dict[str, Any], **ctx_options: Any
) -> tuple[LocalContext, TrainSpec]:
    root = cached["root"]
    spec = TrainSpec(
        name="cats",
        model="tiny-sdxl",
        options=TrainSettings(**options),
        output_dir=str(root / "outputs" / "loras" / run),
    )
    ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / run,
        upstream_results={"cache": cached["cache"]},
        **ctx_options,
    )
    return ctx, spec


def _lora_tensors(spec: TrainSpec) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(lora_path(spec.output_dir, spec.name)))


def _scalars(spec: TrainSpec, tag: str) -> list[tuple[int, float]]:
    """A scalar series as TensorBoard's own reader sees it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(spec.output_dir) / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _step_tensors(spec: TrainSpec, step: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(step_lora_path(spec.output_dir, spec.name, step)))


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    different = [key for key in a if not a[key].equal(b[key])]
    assert different == []


@pytest.fixture(scope="module")
def reference(cached: dict[str, Any]) -> dict[str, Any]:
    """An uninterrupted run with RICH options."""
    ctx, spec = _train(cached, "reference", RICH)
    result = STAGE.run(spec, ctx)
    return {
        "result": result,
        "tensors": _lora_tensors(spec),
        "step4": _step_tensors(spec, 4),
        "ctx": ctx,
        "spec": spec,
    }


def test_outputs_metadata_and_progress(cached: dict[str, Any]) -> None:
    from safetensors import safe_open

    options = {"steps": 4, "checkpoint_every": 2, "rank": 4, "validation_prompts": ["sks cat"]}
    ctx, spec = _train(cached, "outputs", options)
    result = STAGE.run(spec, ctx)
    out = Path(spec.output_dir)
    assert result["lora"] == str(out / "cats.safetensors")
    assert (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,validation_loss" and len(rows) == 5
    # the validation loss on checkpoint steps only
    assert [bool(row.split(",")[3]) for row in rows[1:]] == [False, True, False, True]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "contact-sheet.png",
        "step-000002-00.png",
        "step-000004-00.png",
    ]
    from PIL import Image

    with Image.open(out / "validation" / "step-000004-00.png") as image:
        assert image.size == (96, 64)
        parameters = image.text["parameters"]
    from dropkiln.stages.models import resolve_model

    model = resolve_model(spec.model, ctx.root / "state" / "models")
    unet_file = model.path / "unet" / "diffusion_pytorch_model.safetensors"
    unet_bytes = unet_file.read_bytes()
    unet_sha256 = hashlib.sha256(unet_bytes).hexdigest()
    # A1111's infotext: the prompt line, then the settings of a generated image
    assert parameters.startswith("sks cat\nSteps: 20, Sampler: ")
    assert f"Model hash: {unet_sha256[:10]}, Model: tiny-sdxl," in parameters
    kinds = sorted({kind for _, kind in ctx.artifacts})
    assert kinds == [
        "contact-sheet",
        "lora",
        "lora-diffusers",
        "lora-step",
        "loss-csv",
        "loss-plot",
        "validation-image",
    ]
    done, total, metrics = ctx.progress_log[-1]
    assert (done, total) == (4, 4)
    assert set(metrics) == {"loss", "lr", "it_s", "memory"}
    assert metrics["memory"] > 0 and metrics["it_s"] > 0
    assert [c["step"] for c in ctx.checkpoints] == [2, 4]
    # the newest and the one before it, to fall back on if the newest is damaged
    assert sorted(p.name for p in (ctx.work_dir / "checkpoints").iterdir()) == [
        "step-0000002",
        "step-0000004",
    ]

    with safe_open(result["lora"], framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys)
    assert float(alpha) == 4.0
    assert metadata["ss_network_dim"] == "4"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_steps"] == "4"
    # the checkpoint hashes kohya writes: the file's sha256, and A1111's old hash of the
    # 64 KiB at offset 1 MiB (a diffusers folder is known by its UNet weights)
    assert metadata["ss_new_sd_model_hash"] == unet_sha256
    legacy = hashlib.sha256(unet_bytes[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert metadata["ss_sd_model_hash"] == legacy
    buckets = json.loads(metadata["ss_bucket_info"])
    assert sum(b["count"] for b in buckets["buckets"].values()) == int(
        metadata["ss_num_train_images"]
    )
    assert all(len(b["resolution"]) == 2 for b in buckets["buckets"].values())
    assert isinstance(buckets["mean_img_ar_error"], float)
    (dataset,) = json.loads(metadata["ss_datasets"])
    assert dataset["bucket_info"] == buckets and dataset["subsets"][0]["img_count"] >= 1
    assert metadata["ss_enable_bucket"] == "True" and int(metadata["ss_session_id"]) >= 0
    assert int(metadata["ss_epoch"]) == int(metadata["ss_num_epochs"]) >= 1
    assert metadata["ss_clip_skip"] == "None" and metadata["ss_total_batch_size"] == "1"
    assert len(metadata["sshs_legacy_hash"]) == 8 and len(metadata["sshs_model_hash"]) == 64
    assert metadata["ss_resolution"] == "(96, 64)"  # the most common bucket (ties: larger)
    assert json.loads(metadata["ss_tag_frequency"])["cats"]["red hair"] == 4
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"


def test_stop_and_resume_is_bit_identical(
    cached: dict[str, Any], reference: dict[str, Any]
) -> None:
    # two micro-batches a step: should_stop is asked between them and after the step
    ctx, spec = _train(cached, "stopped", RICH, stop_after=6)
    with pytest.raises(StageStopped):
        STAGE.run(spec, ctx)
    assert ctx.saved == {"checkpoint": "checkpoints/step-0000003", "step": 3}
    resumed = LocalContext(
        root=ctx.root, work_dir=ctx.work_dir, upstream_results=ctx.upstream_results, saved=ctx.saved
    )
    result = STAGE.run(spec, resumed)
    assert resumed.progress_log[0][0] == 4  # it went on from step 3, not from the start
    _assert_identical(_lora_tensors(spec), reference["tensors"])
    _assert_identical(_step_tensors(spec, 4), reference["step4"])
    assert result["final_loss"] == reference["result"]["final_loss"]
    csv = (Path(spec.output_dir) / "loss.csv").read_text()
    assert csv == (Path(reference["result"]["loss_csv"])).read_text()
    # TensorBoard shows the run as if undisturbed: one point per step, the reference's values
    assert _scalars(spec, "loss/train") == _scalars(reference["spec"], "loss/train")
    assert _scalars(spec, "loss/validation") == _scalars(reference["spec"], "loss/validation")


def test_oom_resumes_on_the_gradient_checkpointing_rung_identically(
    cached: dict[str, Any], reference: dict[str, Any]
) -> None:
    import torch

    ctx, spec = _train(cached, "oom", RICH, faults=FaultInjector("oom@train.step:5"))
    with pytest.raises(torch.OutOfMemoryError):
        STAGE.run(spec, ctx)
    assert ctx.saved is not None and ctx.saved["step"] == 4
    ctx.memory_rung = 1
    assert STAGE.rung(1).name == "gradient-checkpointing"
    result = STAGE.run(spec, ctx)
    assert result["gradient_checkpointing"] and result["memory_rung"] == "gradient-checkpointing"
    assert ctx.progress_log[-2][0] == 5  # resumed at step 5 after the step-4 checkpoint
    _assert_identical(_lora_tensors(spec), reference["tensors"])
    _assert_identical(_step_tensors(spec, 4), reference["step4"])


def test_smaller_micro_batches_keep_the_effective_batch(
    cached: dict[str, Any], reference: dict[str, Any]
) -> None:
    assert [r.name for r in STAGE.ladder] == [
        "default",
        "gradient-checkpointing",
        "half-micro-batch",
        "quarter-micro-batch",
        "micro-batch-1",
    ]
    ctx, spec = _train(cached, "micro", RICH, memory_rung=4)
    assert STAGE.run(spec, ctx)["micro_batch"] == 1
    tensors = _lora_tensors(spec)
    # Same images, noise and timesteps; only the summation order of the gradient differs,
    # by float32 rounding. Adam divides each element's step by its own gradient scale, so an
    # element whose gradient is near zero can move by rounding noise: an element-wise rtol is
    # the wrong measure (it failed on elements of 1e-3 differing by 1e-7). Measured here:
    # largest element difference 3.1e-6 (weights up to 2.0), largest relative difference of a
    # whole tensor 1.0e-5. A wrong effective batch changes the run by orders of magnitude more.
    for key, value in reference["tensors"].items():
        difference = (tensors[key] - value).norm() / value.norm()
        assert difference < 1e-4, (key, difference.item())
        assert (tensors[key] - value).abs().max() < 1e-4, key


def test_checkpoint_fault_point_and_a_fresh_start_after_a_lost_checkpoint(
    cached: dict[str, Any], reference: dict[str, Any]
) -> None:
    import shutil

    import torch

    ctx, spec = _train(cached, "lost", RICH, faults=FaultInjector("oom@train.checkpoint:2"))
    with pytest.raises(torch.OutOfMemoryError):
        STAGE.run(spec, ctx)
    assert ctx.saved is not None and ctx.saved["step"] == 4
    shutil.rmtree(ctx.work_dir / "checkpoints")
    STAGE.run(spec, ctx)  # starts over: same seed, same LoRA
    _assert_identical(_lora_tensors(spec), reference["tensors"])


def test_adafactor_v_prediction_zero_terminal_snr_resume_exactly(cached: dict[str, Any]) -> None:
    options = {
        "steps": 4,
        "checkpoint_every": 10,
        "rank": 2,
        "optimizer": "adafactor",
        "prediction_type": "v_prediction",
        "zero_terminal_snr": True,
        "min_snr_gamma": 5.0,
        "lr_scheduler": "linear",
        "lr_warmup_steps": 1,
    }
    ctx, spec = _train(cached, "adafactor-full", options)
    STAGE.run(spec, ctx)
    full = _lora_tensors(spec)
    ctx, spec = _train(cached, "adafactor-stopped", options, stop_after=2)
    with pytest.raises(StageStopped):
        STAGE.run(spec, ctx)
    ctx.stop_after = None
    STAGE.run(spec, ctx)
    _assert_identical(_lora_tensors(spec), full)


def test_bad_options_fail_with_reasons(cached: dict[str, Any]) -> None:
    ctx, spec = _train(cached, "bad", {"steps": 1, "zero_terminal_snr": True})
    with pytest.raises(StageError, match="v_prediction"):
        STAGE.run(spec, ctx)
    ctx, spec = _train(cached, "bad", {"steps": 1, "optimizer": "adamw8bit"})
    with pytest.raises(StageError, match="adamw8bit needs a CUDA device"):
        STAGE.run(spec, ctx)
    ctx, spec = _train(cached, "bad", {"steps": 1, "timestep_min": 900, "timestep_max": 100})
    with pytest.raises(StageError, match="timestep range"):
        STAGE.run(spec, ctx)
    ctx, spec = _train(cached, "bad", {"steps": 1})
    with pytest.raises(StageError, match="made for model tiny-sdxl"):
        STAGE.run(spec.model_copy(update={"model": "tiny-sd15"}), ctx)


def test_warm_pipeline_is_reused_and_left_clean(cached: dict[str, Any]) -> None:
    import torch

    from dropkiln.stages.models import resolve_model, shared_pipelines, weights_checksum

    ref = resolve_model("tiny-sdxl", cached["root"] / "state" / "models")
    cache = shared_pipelines()
    pipe = cache.get(ref, "cpu", torch.float32)
    loads = cache.loads
    before = weights_checksum(pipe.components)
    options = {"steps": 2, "rank": 2, "train_text_encoder": True, "gradient_checkpointing": True}
    ctx, spec = _train(cached, "clean", options)
    STAGE.run(spec, ctx)
    assert cache.loads == loads
    assert cache.get(ref, "cpu", torch.float32) is pipe
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name)
        assert not hasattr(model, "peft_config"), name
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert not pipe.unet.is_gradient_checkpointing
    assert weights_checksum(pipe.components) == before


def test_damaged_shard_is_reencoded_before_training(cached: dict[str, Any]) -> None:
    from dropkiln.stages.cache import CacheIndex, read_shard
    from dropkiln.stages.shards import ShardStore

    index = CacheIndex.load(cached["cache"].index)
    store = ShardStore(Path(index.cache_dir))
    entry = index.images[0].latents
    good = read_shard(store, entry)
    shard = store.root / entry.shard
    shard.write_bytes(shard.read_bytes()[:-16])
    ctx, spec = _train(cached, "repair", {"steps": 1, "rank": 2})
    result = STAGE.run(spec, ctx)
    assert result["repaired_shards"] == 1
    repaired = read_shard(store, entry)
    assert all(repaired[k].allclose(good[k], atol=1e-6) for k in good)


@pytest.mark.slow
def test_every_checkpoint_is_the_lora_a_run_of_that_length_writes(cached: dict[str, Any]) -> None:
    """The step-2 file of a 4-step run holds exactly what a 2-step run exports (EMA
    weights included), with kohya's metadata for step 2; the final file keeps its name."""
    from safetensors import safe_open

    common = {"checkpoint_every": 2, "rank": 2, "learning_rate": 5e-3, "ema_decay": 0.9}
    ctx, long_run = _train(cached, "every-4", {"steps": 4, **common})
    result = STAGE.run(long_run, ctx)
    _, short_run = _train(cached, "every-2", {"steps": 2, **common})
    STAGE.run(short_run, _train(cached, "every-2", {"steps": 2, **common})[0])
    out = Path(long_run.output_dir)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "cats-step000002.safetensors",
        "cats.safetensors",
    ]
    assert result["step_loras"] == [str(out / "cats-step000002.safetensors")]
    _assert_identical(_step_tensors(long_run, 2), _lora_tensors(short_run))
    with safe_open(str(step_lora_path(out, "cats", 2)), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_steps"] == "2" and metadata["ss_max_train_steps"] == "4"
    assert metadata["ss_output_name"] == "cats" and metadata["ss_network_dim"] == "2"
    assert ("lora-step" in {kind for _, kind in ctx.artifacts}) and (
        out / "cats-step000002.safetensors",
        "lora-step",
    ) in ctx.artifacts


@pytest.mark.slow
def test_keep_loras_keeps_the_newest_step_files(cached: dict[str, Any]) -> None:
    options = {"steps": 6, "checkpoint_every": 1, "rank": 2, "keep_loras": 2}
    ctx, spec = _train(cached, "keep", options)
    STAGE.run(spec, ctx)
    assert sorted(p.name for p in Path(spec.output_dir).glob("*.safetensors")) == [
        "cats-step000004.safetensors",
        "cats-step000005.safetensors",
        "cats.safetensors",
    ]
    # only files still on disk are recorded (store check verifies every recorded artifact)
    recorded = sorted(path.name for path, kind in ctx.artifacts if kind.startswith("lora"))
    assert recorded == [
        "cats-step000004.safetensors",
        "cats-step000005.safetensors",
        "cats.safetensors",
        "pytorch_lora_weights.safetensors",
    ]


@pytest.mark.slow
def test_contact_sheet_lines_up_each_prompt_across_steps(cached: dict[str, Any]) -> None:
    from PIL import Image

    from dropkiln.stages.generation.png_files import THUMB_SIDE

    prompts = ["sks cat", "a red cat"]
    options = {"steps": 3, "checkpoint_every": 1, "rank": 2, "validation_prompts": prompts}
    ctx, spec = _train(cached, "sheet", options)
    STAGE.run(spec, ctx)
    folder = Path(spec.output_dir) / "validation"
    side = THUMB_SIDE // 2
    with Image.open(folder / "contact-sheet.png") as sheet:
        # a label column and one column per step (1, 2, 3); a header and one row per prompt
        assert sheet.size == (2 * side + 3 * side, 16 + 2 * side)
        cell = sheet.convert("RGB").crop((2 * side + 2 * side, 16 + side, 5 * side, 16 + 2 * side))
    with Image.open(folder / "step-000003-01.png") as image:
        width, height = image.size
        scale = min(side / width, side / height)
        expected = image.convert("RGB").resize(
            (round(width * scale), round(height * scale)), Image.Resampling.LANCZOS
        )
    left, top = (side - expected.width) // 2, (side - expected.height) // 2
    placed = cell.crop((left, top, left + expected.width, top + expected.height))
    assert placed.tobytes() == expected.tobytes()  # the last step's image of prompt 2


# Defect 12: resume is all or nothing, and says where it went on from ----------------------

STEADY = {"steps": 6, "checkpoint_every": 2, "batch_size": 2, "rank": 4, "ema_decay": 0.9}


@pytest.fixture(scope="module")
def steady_reference(cached: dict[str, Any]) -> dict[str, Any]:
    ctx, spec = _train(cached, "steady-reference", STEADY)
    STAGE.run(spec, ctx)
    return _lora_tensors(spec)


def _stopped_at_step_six(cached: dict[str, Any], run: str) -> tuple[LocalContext, TrainSpec]:
    """Checkpoints at steps 2 and 4 recorded, then an OOM at the start of step 6."""
    import torch

    ctx, spec = _train(cached, run, STEADY, faults=FaultInjector("oom@train.step:6"))
    with pytest.raises(torch.OutOfMemoryError):
        STAGE.run(spec, ctx)
    assert ctx.saved == {"checkpoint": "checkpoints/step-0000004", "step": 4}
    return ctx, spec


def _resumed(ctx: LocalContext, spec: TrainSpec) -> LocalContext:
    again = LocalContext(
        root=ctx.root, work_dir=ctx.work_dir, upstream_results=ctx.upstream_results, saved=ctx.saved
    )
    STAGE.run(spec, again)
    return again


def test_defect12_damaged_checkpoint_is_recorded_and_resume_falls_back_one_interval(
    cached: dict[str, Any], steady_reference: dict[str, Any]
) -> None:
    ctx, spec = _stopped_at_step_six(cached, "damaged-latest")
    tensors = ctx.work_dir / "checkpoints" / "step-0000004" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    again = _resumed(ctx, spec)
    assert len(again.unusable) == 1
    checkpoint, reason, resumed_from = again.unusable[0]
    assert checkpoint == "checkpoints/step-0000004" and resumed_from == 2, again.unusable
    assert reason
    assert again.progress_log[0][0] == 3  # the first step run after the resume
    _assert_identical(_lora_tensors(spec), steady_reference)


def test_defect12_a_checkpoint_failing_half_way_restores_nothing_of_it(
    cached: dict[str, Any], steady_reference: dict[str, Any]
) -> None:
    """The weights read fine, the optimizer state does not fit: old code copied the step-4
    weights, then gave up and trained from step 0 with them and a fresh optimizer."""
    ctx, spec = _stopped_at_step_six(cached, "half-restore")
    state_file = ctx.work_dir / "checkpoints" / "step-0000004" / "state.json"
    state = json.loads(state_file.read_text())
    groups = state["__dict__"]["optimizer"]["__dict__"]["param_groups"]
    groups[0]["__dict__"]["params"].append(10_000)
    state_file.write_text(json.dumps(state))
    again = _resumed(ctx, spec)
    assert [(c, step) for c, _, step in again.unusable] == [("checkpoints/step-0000004", 2)]
    assert "optimizer" in again.unusable[0][1]
    assert again.progress_log[0][0] == 3
    _assert_identical(_lora_tensors(spec), steady_reference)


def test_defect12_with_no_usable_checkpoint_it_restarts_from_step_one_and_says_so(
    cached: dict[str, Any], steady_reference: dict[str, Any]
) -> None:
    import shutil

    ctx, spec = _stopped_at_step_six(cached, "all-gone")
    assert sorted(p.name for p in (ctx.work_dir / "checkpoints").iterdir()) == [
        "step-0000002",
        "step-0000004",
    ]
    shutil.rmtree(ctx.work_dir / "checkpoints")
    again = _resumed(ctx, spec)
    assert [(c, step) for c, _, step in again.unusable] == [("checkpoints/step-0000004", 0)]
    assert again.progress_log[0][0] == 1
    _assert_identical(_lora_tensors(spec), steady_reference)


# Defect 5: a stop request is obeyed within a micro-batch, and within a validation image ----


def test_defect5_a_stop_between_micro_batches_undoes_the_step_and_resumes_identically(
    cached: dict[str, Any], reference: dict[str, Any]
) -> None:
    ctx, spec = _train(cached, "mid-step", RICH, stop_after=5)  # between step 3's micro-batches
    with pytest.raises(StageStopped, match="during step 3"):
        STAGE.run(spec, ctx)
    assert ctx.saved == {"checkpoint": "checkpoints/step-0000002", "step": 2}
    resumed = LocalContext(
        root=ctx.root, work_dir=ctx.work_dir, upstream_results=ctx.upstream_results, saved=ctx.saved
    )
    STAGE.run(spec, resumed)
    assert resumed.progress_log[0][0] == 3
    _assert_identical(_lora_tensors(spec), reference["tensors"])


VALIDATED = {"steps": 4, "checkpoint_every": 2, "rank": 2, "validation_prompts": ["a", "b"]}


def test_defect5_a_stop_between_validation_images_keeps_the_step_and_makes_them_on_resume(
    cached: dict[str, Any],
) -> None:
    ctx, spec = _train(cached, "validated-whole", VALIDATED)
    STAGE.run(spec, ctx)
    whole = _lora_tensors(spec)
    folder = Path(spec.output_dir) / "validation"
    expected = {p.name: p.read_bytes() for p in folder.iterdir()}
    # calls: after step 1, then before each validation image of step 2
    ctx, spec = _train(cached, "validated-stopped", VALIDATED, stop_after=3)
    with pytest.raises(StageStopped, match="before validation image 1 of step 2"):
        STAGE.run(spec, ctx)
    assert ctx.saved == {"checkpoint": "checkpoints/step-0000002", "step": 2, "reports_due": True}
    folder = Path(spec.output_dir) / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002-00.png"]
    resumed = LocalContext(
        root=ctx.root, work_dir=ctx.work_dir, upstream_results=ctx.upstream_results, saved=ctx.saved
    )
    STAGE.run(spec, resumed)
    assert resumed.checkpoints[0] == {"checkpoint": "checkpoints/step-0000002", "step": 2}
    assert resumed.progress_log[0][0] == 3
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected
    _assert_identical(_lora_tensors(spec), whole)


# Faults where allocations really fail: inside the forward and the backward ----------------


@pytest.mark.parametrize(
    ("fault", "inside"),
    [
        ("oom-cpu@train.forward:3", "forward"),
        ("oom-cublas@train.backward:3", "backward"),
        ("oom@train.backward:2", "backward"),
    ],
)
def test_an_oom_raised_inside_the_forward_or_backward_resumes_one_rung_down(
    cached: dict[str, Any], reference: dict[str, Any], fault: str, inside: str
) -> None:
    import traceback

    from dropkiln.stages.device import is_out_of_memory

    run = "inside-" + fault.split("@")[1].replace(":", "-")
    ctx, spec = _train(cached, run, RICH, faults=FaultInjector(fault))
    with pytest.raises(Exception) as raised:
        STAGE.run(spec, ctx)
    assert is_out_of_memory(raised.value), raised.value
    frames = "".join(traceback.format_tb(raised.value.__traceback__))
    # raised from within the UNet's forward, or from the autograd engine mid-backward
    assert (
        ("unet" in frames or "forward" in frames) if inside == "forward" else "backward" in frames
    )
    assert "train_step" in frames
    ctx.memory_rung = 1
    STAGE.run(spec, ctx)
    _assert_identical(_lora_tensors(spec), reference["tensors"])


@pytest.mark.slow
def test_tensorboard_files_read_by_tensorboard(cached: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = {"steps": 4, "checkpoint_every": 2, "rank": 2, "validation_prompts": ["sks cat"]}
    ctx, spec = _train(cached, "tracked", options)
    result = STAGE.run(spec, ctx)
    events = EventAccumulator(str(Path(spec.output_dir) / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {
        "loss/train",
        "loss/train_smoothed",
        "loss/validation",
        "lr",
        "grad_norm",
    }
    csv = [row.split(",") for row in (Path(spec.output_dir) / "loss.csv").read_text().split()[1:]]
    train = _scalars(spec, "loss/train")
    assert [step for step, _ in train] == [1, 2, 3, 4]
    assert [value for _, value in train] == pytest.approx([float(row[1]) for row in csv], 1e-5)
    smooth = [value for _, value in _scalars(spec, "loss/train_smoothed")]
    assert smooth[-1] == pytest.approx(sum(float(row[1]) for row in csv) / 4, 1e-5)
    assert all(norm > 0 for _, norm in _scalars(spec, "grad_norm"))
    validation = _scalars(spec, "loss/validation")
    assert [step for step, _ in validation] == [2, 4]
    assert validation[-1][1] == pytest.approx(result["validation_loss"], 1e-6)
    assert tags["images"] == ["validation/00"]
    assert [image.step for image in events.Images("validation/00")] == [2, 4]
    hparams = EventAccumulator(str(Path(spec.output_dir) / "tensorboard" / "hparams"))
    hparams.Reload()
    assert "_hparams_/session_start_info" in hparams.summary_metadata


@pytest.mark.slow
def test_validation_loss_is_deterministic_and_held_out(cached: dict[str, Any]) -> None:
    """The same weights give the same validation loss (fixed images, timesteps and noise);
    a held-out image is not trained on."""
    from safetensors import safe_open

    common = {"checkpoint_every": 2, "rank": 2, "learning_rate": 5e-3, "validation_holdout": 1}
    ctx, long_run = _train(cached, "val-4", {"steps": 4, **common})
    STAGE.run(long_run, ctx)
    ctx, short_run = _train(cached, "val-2", {"steps": 2, **common})
    short = STAGE.run(short_run, ctx)
    assert _scalars(long_run, "loss/validation")[0] == (2, pytest.approx(short["validation_loss"]))
    with safe_open(short["lora"], framework="pt") as handle:
        assert handle.metadata()["ss_num_train_images"] == "3"
    ctx, spec = _train(cached, "val-none", {"steps": 1, "validation_holdout": 4})
    with pytest.raises(StageError, match="leaves no image to train on"):
        STAGE.run(spec, ctx)


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "learning_rate"), [("prodigy", 1.0), ("soap", 3e-3)])
def test_prodigy_and_soap_train_and_resume_bit_exactly(
    cached: dict[str, Any], optimizer: str, learning_rate: float
) -> None:
    """Both run on the CPU; their state (Prodigy's d estimates, SOAP's eigenbases) goes
    through the pickle-free checkpoint and the resumed run ends on the same bits."""
    options = {
        "steps": 4,
        "checkpoint_every": 10,
        "rank": 2,
        "optimizer": optimizer,
        "learning_rate": learning_rate,
        "lr_warmup_steps": 1,
    }
    ctx, spec = _train(cached, f"{optimizer}-full", options)
    STAGE.run(spec, ctx)
    full = _lora_tensors(spec)
    ctx, spec = _train(cached, f"{optimizer}-stopped", options, stop_after=2)
    with pytest.raises(StageStopped):
        STAGE.run(spec, ctx)
    state = json.loads((ctx.work_dir / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert "pickle" not in json.dumps(state)
    ctx.stop_after = None
    STAGE.run(spec, ctx)
    _assert_identical(_lora_tensors(spec), full)
    initial = {k: v for k, v in full.items() if k.endswith("lora_up.weight")}
    assert any(v.abs().sum() > 0 for v in initial.values())  # it trained (lora_up starts at 0)


# Issue 16: per-step work the clean loop does not do ----------------------------------------


def test_a_step_of_one_micro_batch_keeps_no_random_state_to_undo(
    cached: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop is obeyed between micro-batches only: a step of one cannot be undone, so the
    random generators' states (which the undo would put back) are not copied every step."""
    from dropkiln.stages.training import loop

    captured: list[str] = []
    capture = loop.capture_global_rng

    def counted(device: str) -> Any:
        captured.append(device)
        return capture(device)

    monkeypatch.setattr(loop, "capture_global_rng", counted)
    ctx, spec = _train(cached, "one-micro-batch", {"steps": 3, "checkpoint_every": 3, "rank": 2})
    STAGE.run(spec, ctx)
    assert captured == []
    # two micro-batches a step (gradient accumulation): each step can be undone
    ctx, spec = _train(
        cached, "two-micro-batches",
        {"steps": 3, "checkpoint_every": 3, "rank": 2, "gradient_accumulation": 2},
    )  # fmt: skip
    STAGE.run(spec, ctx)
    assert len(captured) == 3
