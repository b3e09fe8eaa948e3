"""The train stage: a LoRA on the cached latents, checkpointed, resumable bit for bit.

The loop itself (training/loop.py) reads like diffusers' example scripts: batch, noise,
predict, loss, step.

This module is what looking the stage up imports, so it imports torch and the modules of
``stages/training/`` (which import torch at their top) only when the stage runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from dropkiln.options import TrainSettings
from dropkiln.stages.base import (
    MemoryRung,
    StageContext,
    StageDef,
    StageError,
    StageSpec,
)
from dropkiln.stages.starting_rung import training_start_rung

if TYPE_CHECKING:
    from diffusers.loaders.lora_pipeline import (
        StableDiffusionLoraLoaderMixin,
        StableDiffusionXLLoraLoaderMixin,
    )

    from dropkiln.stages.models import ModelRef
    from dropkiln.stages.starting_rung import StartFacts
    from dropkiln.stages.training.data import CachedDataset, CachedImage
    from dropkiln.stages.training.loop import Plan, TrainingLoop
    from dropkiln.stages.training.session import TrainingSession


class TrainSpec(StageSpec):
    name: str
    model: str = "tiny-sdxl"
    vae: str = ""
    """A standalone VAE file (validation images decode with it; the cache encoded with it)."""
    options: TrainSettings = Field(default_factory=TrainSettings)
    output_dir: str
    """ROOT/outputs/loras/NAME; the LoRA is written to OUTPUT_DIR/NAME.safetensors."""


def lora_path(output_dir: Path | str, name: str) -> Path:
    """Where the train stage writes a dataset's LoRA (the planner relies on this)."""
    return Path(output_dir) / f"{name}.safetensors"


def run_train(spec: TrainSpec, ctx: StageContext) -> dict[str, Any]:
    """Train (or resume training) the LoRA and write it with its loss curve."""
    from dropkiln.stages.cache import CacheIndex, CacheResult
    from dropkiln.stages.models import pipeline_class, resolve_model, shared_pipelines
    from dropkiln.stages.training.adapters import lora_adapters
    from dropkiln.stages.training.captions import needs_text_encoder
    from dropkiln.stages.training.data import DataOrder, load_cached_dataset
    from dropkiln.stages.training.exports import LoraExports
    from dropkiln.stages.training.loop import TrainingLoop
    from dropkiln.stages.training.losses import training_scheduler
    from dropkiln.stages.training.phases import DevicePhases, idle_while_stepping
    from dropkiln.stages.training.session import TrainingSession, seed_everything
    from dropkiln.stages.training.tracking import TENSORBOARD, RunTracker, hyperparameters
    from dropkiln.stages.training.wandb_run import open_wandb

    options = spec.options
    _check_options(options)
    plan = _plan(options, STAGE.rung(ctx.memory_rung).options, ctx.device)
    index = CacheIndex.load(CacheResult.upstream(ctx, "cache").index)
    ref = resolve_model(spec.model, ctx.root / "state" / "models", vae=spec.vae)
    if index.model.fingerprint != ref.fingerprint:
        raise StageError(
            f"the latent cache was made for model {index.model.name}, not {spec.model}"
        )
    check_prediction(ref, options)
    pipe = shared_pipelines().get(ref, ctx.device, plan.weight_dtype)
    seed_everything(options.seed)
    with lora_adapters(pipe, options, plan.gradient_checkpointing) as models:
        dataset = load_cached_dataset(index, pipe, ctx.device, options.tag_weights)
        dataset, validation_set = _hold_out(dataset, options.validation_holdout)
        trained = index.images[: len(dataset.images)]
        session = _resume(
            lambda: TrainingSession.start(models, options, ctx.device, plan.fp16), ctx
        )
        order = DataOrder(dataset.buckets(), options.batch_size, options.seed)
        exports = LoraExports(
            name=spec.name,
            output_dir=Path(spec.output_dir),
            ref=ref,
            options=options,
            images=[(e.bucket, e.original_size) for e in trained],
            captions=[image.caption for image in dataset.images],
            resolution=dataset.resolution(),
            batches_per_epoch=order.batches_per_epoch,
            mixed_precision=plan.mixed_precision,
            gradient_checkpointing=plan.gradient_checkpointing,
        )
        loop = TrainingLoop(
            spec=spec,
            ctx=ctx,
            plan=plan,
            pipe=pipe,
            session=session,
            dataset=dataset,
            order=order,
            scheduler=training_scheduler(pipe.scheduler.config, options),
            on_the_fly=needs_text_encoder(options),
            model=ref,
            exports=exports,
            tracker=RunTracker(
                Path(spec.output_dir) / TENSORBOARD,
                session.step,
                hyperparameters(options, plan),
                open_wandb(
                    options.wandb_project,
                    Path(spec.output_dir),
                    spec.name,
                    f"{spec.name}-{int(session.started_at)}",  # the same run when resumed
                    hyperparameters(options, plan),
                ),
            ),
            validation_set=validation_set,
            phases=DevicePhases(pipe, idle_while_stepping(options), ctx.device),
        )
        with closing(loop.tracker):
            loop.run()
            return _finish(loop, ref, pipeline_class(ref.kind))


def _hold_out(dataset: CachedDataset, count: int) -> tuple[CachedDataset, list[CachedImage]]:
    """(the images trained on, the validation loss's images): the last ``count`` images are
    held out of training; with none held out, the validation loss uses the first ones."""
    import dataclasses

    from dropkiln.stages.training.tracking import VALIDATION_LOSS_IMAGES

    if count == 0:
        return dataset, dataset.images[:VALIDATION_LOSS_IMAGES]
    if count >= len(dataset.images):
        raise StageError(
            f"validation_holdout = {count} leaves no image to train on "
            f"(the dataset has {len(dataset.images)})"
        )
    kept = dataset.images[: len(dataset.images) - count]
    return dataclasses.replace(dataset, images=kept), dataset.images[len(kept) :]


def _check_options(options: TrainSettings) -> None:
    if options.timestep_min >= min(options.timestep_max, 1000):
        raise StageError(
            f"timestep range [{options.timestep_min}, {options.timestep_max}) is empty"
        )
    if options.zero_terminal_snr and options.prediction_type != "v_prediction":
        raise StageError(
            'zero_terminal_snr needs prediction_type = "v_prediction": at the last timestep '
            "the latent is pure noise, which an epsilon model cannot sample from"
        )


def check_prediction(ref: ModelRef, options: TrainSettings) -> None:
    """A LoRA of a v-prediction checkpoint must be trained on v targets too."""
    if ref.prediction == "v_prediction" and options.prediction_type != "v_prediction":
        raise StageError(
            f"model {ref.path.name} is a v-prediction checkpoint (the file says so); "
            'set prediction_type = "v_prediction" in dataset.toml'
        )


def _plan(options: TrainSettings, rung: dict[str, Any], device: str) -> Plan:
    import torch

    from dropkiln.stages.models.encoding import compute_dtype
    from dropkiln.stages.training.loop import Plan

    if rung.get("micro_batch") == 1:
        micro = 1
    else:
        micro = max(1, math.ceil(options.batch_size / int(rung.get("micro_batch_divisor", 1))))
    cuda = device.startswith("cuda")
    precision = options.mixed_precision
    if not cuda or precision == "no":
        dtype, precision = torch.float32, "no"
    elif precision == "auto":
        dtype = compute_dtype(device)
        precision = "bf16" if dtype == torch.bfloat16 else "fp16"
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return Plan(
        micro_batch=micro,
        gradient_checkpointing=options.gradient_checkpointing
        or bool(rung.get("gradient_checkpointing")),
        device=device,
        weight_dtype=dtype,
        autocast=cuda and precision != "no",
        fp16=precision == "fp16",
        mixed_precision=precision,
    )


def _resume(new_session: Callable[[], TrainingSession], ctx: StageContext) -> TrainingSession:
    """A session restored from the newest usable checkpoint, or a fresh one.

    A checkpoint that cannot be restored is recorded (CheckpointUnusable, with the step the
    job goes on from) and the one before it is tried. Training is a pure function of the
    seed, so going back to an older checkpoint, or to step 0, gives the same LoRA; only
    time is lost. Each try starts from a fresh session, and a failed restore leaves the
    LoRA weights untouched, so nothing of a damaged checkpoint is ever used.
    """
    from dropkiln.stages.training.checkpoint import fallback_checkpoints
    from dropkiln.stages.training.loop import CHECKPOINTS
    from dropkiln.stages.training.session import CheckpointUnusable

    saved = ctx.resume_state()
    if not saved or "checkpoint" not in saved:
        return new_session()
    unusable: list[tuple[str, str]] = []
    session = None
    for relative in fallback_checkpoints(ctx.work_dir / CHECKPOINTS, saved["checkpoint"]):
        candidate = new_session()
        try:
            candidate.restore(ctx.work_dir / relative, ctx.device)
        except CheckpointUnusable as exc:
            unusable.append((relative, str(exc)))
            continue
        session = candidate
        break
    if session is None:
        session = new_session()
    for relative, reason in unusable:
        ctx.checkpoint_unusable(relative, reason, session.step)
    return session


def _finish(
    loop: TrainingLoop,
    ref: ModelRef,
    pipeline_cls: type[StableDiffusionLoraLoaderMixin | StableDiffusionXLLoraLoaderMixin],
) -> dict[str, Any]:
    """Export the LoRA (EMA weights when EMA is on) in both formats."""
    from dropkiln.stages.training.exports import step_loras
    from dropkiln.stages.training.lora_export import write_diffusers
    from dropkiln.stages.training.report import CONTACT_SHEET

    session, options = loop.session, loop.spec.options
    if session.ema is not None:
        session.ema.copy_to(session.models.parameters())
    out = Path(loop.spec.output_dir)
    kohya = loop.exports.write(lora_path(out, loop.spec.name), session, session.step)
    diffusers = write_diffusers(out / "diffusers", pipeline_cls, session.models)
    validation_loss = loop.measure_validation_loss(session.step)
    reports = loop.write_reports(session.step)
    final_loss = session.losses[-1][1] if session.losses else None
    loop.tracker.finish(final_loss, validation_loss)
    loop.ctx.artifact(kohya, "lora")
    kept = [path for _, path in step_loras(out, loop.spec.name)]
    for path in kept:
        loop.ctx.artifact(path, "lora-step")
    loop.ctx.artifact(diffusers, "lora-diffusers")
    for path in reports:
        loop.ctx.artifact(path, _report_kind(path))
    return {
        "lora": str(kohya),
        "step_loras": [str(path) for path in kept],
        "diffusers_lora": str(diffusers),
        "loss_csv": str(out / "loss.csv"),
        "loss_png": str(out / "loss.png"),
        "validation_images": [str(p) for p in reports if _report_kind(p) == "validation-image"],
        "contact_sheet": next((str(p) for p in reports if p.name == CONTACT_SHEET), None),
        "steps": session.step,
        "final_loss": final_loss,
        "validation_loss": validation_loss,
        "tensorboard": str(out / "tensorboard"),
        "model": ref.name,
        "kind": ref.kind,
        "rank": options.rank,
        "alpha": session.models.alpha,
        "repaired_shards": loop.dataset.repaired,
        "memory_rung": STAGE.rung(loop.ctx.memory_rung).name,
        "micro_batch": loop.plan.micro_batch,
        "gradient_checkpointing": loop.plan.gradient_checkpointing,
    }


def _report_kind(path: Path) -> str:
    from dropkiln.stages.training.report import CONTACT_SHEET

    if path.suffix == ".csv":
        return "loss-csv"
    if path.name == CONTACT_SHEET:
        return "contact-sheet"
    if path.parent.name == "validation":
        return "validation-image"
    return "loss-plot"


def estimated_start_rung(spec: TrainSpec, facts: StartFacts) -> int | None:
    """The first rung the job is estimated to fit (None without a known family)."""
    family = facts.family(spec.model)
    if family is None:
        return None
    options = spec.options
    return training_start_rung(
        STAGE.ladder,
        family,
        facts.resolution(1024),
        options.batch_size,
        options.rank,
        options.optimizer,
        facts.available,
    )


STAGE = StageDef(
    "train",
    "gpu",
    TrainSpec,
    run_train,
    ladder=(
        MemoryRung("default", {}),
        MemoryRung("gradient-checkpointing", {"gradient_checkpointing": True}),
        MemoryRung("half-micro-batch", {"gradient_checkpointing": True, "micro_batch_divisor": 2}),
        MemoryRung(
            "quarter-micro-batch", {"gradient_checkpointing": True, "micro_batch_divisor": 4}
        ),
        MemoryRung("micro-batch-1", {"gradient_checkpointing": True, "micro_batch": 1}),
    ),
    priority=0,
    start_rung=estimated_start_rung,
    inputs=("cache-index",),
)
