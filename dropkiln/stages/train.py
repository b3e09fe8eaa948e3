"""The train stage: a LoRA on the cached latents, checkpointed, resumable bit for bit.

The loop reads like diffusers' example scripts: batch, noise, predict, loss, step. A
step is ``gradient_accumulation`` bucket batches of ``batch_size`` images; each batch has
all its randomness drawn up front and is then cut into micro-batches, so the memory
ladder's smaller micro-batches see the same images, noise and timesteps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from dropkiln.config import TrainSettings
from dropkiln.stages.base import (
    MemoryRung,
    StageContext,
    StageDef,
    StageError,
    StageSpec,
    StageStopped,
)

CHECKPOINTS = "checkpoints"


class TrainSpec(StageSpec):
    name: str
    model: str = "tiny-sdxl"
    options: TrainSettings = Field(default_factory=TrainSettings)
    output_dir: str
    """ROOT/outputs/loras/NAME; the LoRA is written to OUTPUT_DIR/NAME.safetensors."""


@dataclass(frozen=True)
class Plan:
    """How this attempt runs, from the settings and the memory rung."""

    micro_batch: int
    gradient_checkpointing: bool
    device: str
    weight_dtype: Any
    autocast: bool
    fp16: bool
    mixed_precision: str


def lora_path(output_dir: Path | str, name: str) -> Path:
    """Where the train stage writes a dataset's LoRA (the planner relies on this)."""
    return Path(output_dir) / f"{name}.safetensors"


def run_train(spec: TrainSpec, ctx: StageContext) -> dict[str, Any]:
    """Train (or resume training) the LoRA and write it with its loss curve."""
    from dropkiln.stages.models import pipeline_class, resolve_model, shared_pipelines
    from dropkiln.stages.training.adapters import lora_adapters
    from dropkiln.stages.training.captions import needs_text_encoder
    from dropkiln.stages.training.data import DataOrder, load_cached_dataset, read_index
    from dropkiln.stages.training.losses import training_scheduler
    from dropkiln.stages.training.session import TrainingSession, seed_everything

    options = spec.options
    _check_options(options)
    plan = _plan(options, STAGE.rung(ctx.memory_rung).options, ctx.device)
    index = read_index(ctx.upstream("cache")["index"])
    ref = resolve_model(spec.model, ctx.root / "state" / "models")
    if index["model"]["fingerprint"] != ref.fingerprint:
        raise StageError(
            f"the latent cache was made for model {index['model']['name']}, not {spec.model}"
        )
    pipe = shared_pipelines().get(ref, ctx.device, plan.weight_dtype)
    seed_everything(options.seed)
    with lora_adapters(pipe, options, plan.gradient_checkpointing) as models:
        dataset = load_cached_dataset(index, pipe, ctx.device, options.tag_weights)
        session = TrainingSession.start(models, options, ctx.device, plan.fp16)
        _resume(session, ctx)
        loop = _Loop(
            spec=spec,
            ctx=ctx,
            plan=plan,
            pipe=pipe,
            session=session,
            dataset=dataset,
            order=DataOrder(dataset.buckets(), options.batch_size, options.seed),
            scheduler=training_scheduler(pipe.scheduler.config, options),
            on_the_fly=needs_text_encoder(options),
        )
        loop.run()
        return loop.finish(ref, pipeline_class(ref.kind))


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


def _plan(options: TrainSettings, rung: dict[str, Any], device: str) -> Plan:
    import torch

    from dropkiln.stages.training.encoding import compute_dtype

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


def _resume(session: Any, ctx: StageContext) -> None:
    saved = ctx.resume_state()
    if not saved or "checkpoint" not in saved:
        return
    try:
        session.restore(ctx.work_dir / saved["checkpoint"], ctx.device)
    except (OSError, ValueError, KeyError):
        # Training is a pure function of the seed, so starting over from a fresh session
        # gives the same LoRA; only time is lost.
        return


@dataclass
class _Loop:
    spec: TrainSpec
    ctx: StageContext
    plan: Plan
    pipe: Any
    session: Any
    dataset: Any
    order: Any
    scheduler: Any
    on_the_fly: bool
    _memory: int = 0
    _memory_at: float = -math.inf

    def run(self) -> None:
        options = self.spec.options
        total = options.steps
        started, first_step = time.perf_counter(), self.session.step
        while self.session.step < total:
            self.ctx.fault("train.step")
            loss = self.train_step()
            step = self.session.step
            self.session.losses.append((step, loss, self.session.lr))
            rate = (step - first_step) / max(time.perf_counter() - started, 1e-9)
            self.ctx.progress(
                step, total, loss=loss, lr=self.session.lr, it_s=rate, memory=self.memory()
            )
            due = step % options.checkpoint_every == 0 or step == total
            if due:
                # The final step's reports come from finish(), after the EMA weights are in.
                self.checkpoint(reports=step < total)
            if self.ctx.should_stop():
                if not due:
                    self.checkpoint(reports=False)
                raise StageStopped(f"training stopped at step {step} (checkpoint saved)")

    def train_step(self) -> float:
        """One optimizer step: accumulate over bucket batches and their micro-batches."""
        import torch

        from dropkiln.stages.training.data import assemble_batch

        options, session = self.spec.options, self.session
        first = session.step * options.gradient_accumulation
        positions = range(first, first + options.gradient_accumulation)
        batches = [
            assemble_batch(
                self.dataset,
                self.order.batch(position),
                session.data_rng,
                session.noise_generator,
                options,
                self.scheduler.config.num_train_timesteps,
                self.on_the_fly,
            )
            for position in positions
        ]
        samples = sum(len(batch) for batch in batches)
        step_loss = 0.0
        for batch in batches:
            for start in range(0, len(batch), self.plan.micro_batch):
                micro = batch.rows(start, start + self.plan.micro_batch)
                loss = self.micro_batch_loss(micro) / samples
                if session.scaler is not None:
                    session.scaler.scale(loss).backward()
                else:
                    loss.backward()
                step_loss += float(loss.detach())
        params = session.models.parameters()
        if session.scaler is not None:
            session.scaler.unscale_(session.optimizer)
        if options.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        if session.scaler is not None:
            session.scaler.step(session.optimizer)
            session.scaler.update()
        else:
            session.optimizer.step()
        session.lr_scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
        if session.ema is not None:
            session.ema.step(params)
        session.step += 1
        return step_loss

    def micro_batch_loss(self, batch: Any) -> Any:
        """Sum over the micro-batch of each image's weighted diffusion loss."""
        import torch

        from dropkiln.stages.training.encoding import encode_captions
        from dropkiln.stages.training.losses import (
            min_snr_weights,
            noisy_latents_and_target,
            per_sample_mse,
        )

        noisy, target = noisy_latents_and_target(self.scheduler, batch.latents, batch.draw)
        if batch.cached_text is not None:
            text = batch.cached_text
        elif self.spec.options.train_text_encoder:
            text = encode_captions(self.pipe, batch.captions)
        else:
            with torch.no_grad():
                text = encode_captions(self.pipe, batch.captions)
        dtype = self.plan.weight_dtype
        conditioning: dict[str, Any] = {}
        if "pooled_prompt_embeds" in text:
            conditioning["added_cond_kwargs"] = {
                "text_embeds": text["pooled_prompt_embeds"].to(dtype),
                "time_ids": batch.time_ids.to(dtype),
            }
        with torch.autocast(self.plan.device.split(":")[0], dtype, enabled=self.plan.autocast):
            prediction = self.pipe.unet(
                noisy.to(dtype),
                batch.draw.timesteps,
                encoder_hidden_states=text["prompt_embeds"].to(dtype),
                **conditioning,
            ).sample
        weights = batch.weights * min_snr_weights(
            self.scheduler, batch.draw.timesteps, self.spec.options.min_snr_gamma
        )
        return (per_sample_mse(prediction, target) * weights).sum()

    def memory(self) -> int:
        """Bytes in use, sampled at most once a second (progress is reported every step)."""
        now = time.monotonic()
        if now - self._memory_at >= 1.0:
            self._memory_at = now
            if self.plan.device.startswith("cuda"):
                import torch

                self._memory = int(torch.cuda.memory_allocated(self.plan.device))
            else:
                self._memory = _process_rss()
        return self._memory

    def checkpoint(self, reports: bool) -> None:
        from dropkiln.stages.training.checkpoint import prune_checkpoints

        self.ctx.fault("train.checkpoint")
        step = self.session.step
        relative = f"{CHECKPOINTS}/step-{step:07d}"
        folder = self.session.save(self.ctx.work_dir / relative, self.ctx.device)
        self.ctx.checkpoint({"checkpoint": relative, "step": step})
        prune_checkpoints(self.ctx.work_dir / CHECKPOINTS, keep=folder)
        if reports:
            self.write_reports(step)

    def write_reports(self, step: int) -> list[Path]:
        """Loss curve files, and validation images when there are prompts."""
        from dropkiln.stages.training.losses import generation_scheduler
        from dropkiln.stages.training.report import (
            validation_images,
            write_loss_csv,
            write_loss_plot,
        )

        out = Path(self.spec.output_dir)
        options = self.spec.options
        written = [
            write_loss_csv(out / "loss.csv", self.session.losses),
            write_loss_plot(out / "loss.png", self.session.losses, f"{self.spec.name}: loss"),
        ]
        if options.validation_prompts:
            self.pipe.unet.eval()
            try:
                written += validation_images(
                    self.pipe,
                    options.validation_prompts,
                    self.dataset.resolution(),
                    options.seed,
                    generation_scheduler(self.pipe.scheduler, options),
                    out / "validation",
                    step,
                )
            finally:
                self.pipe.unet.train()
        return written

    def finish(self, ref: Any, pipeline_cls: Any) -> dict[str, Any]:
        """Export the LoRA (EMA weights when EMA is on) in both formats."""
        import datetime

        from dropkiln.stages.training.captions import tag_frequency
        from dropkiln.stages.training.lora_export import write_diffusers, write_kohya

        session, options = self.session, self.spec.options
        if session.ema is not None:
            session.ema.copy_to(session.models.parameters())
        out = Path(self.spec.output_dir)
        finished = datetime.datetime.now(datetime.UTC)
        facts = {
            "name": self.spec.name,
            "kind": ref.kind,
            "model_name": ref.name,
            "model_fingerprint": ref.fingerprint,
            "resolution": self.dataset.resolution(),
            "options": options,
            "alpha": session.models.alpha,
            "steps": session.step,
            "num_images": len(self.dataset.images),
            "tag_frequency": tag_frequency(image.caption for image in self.dataset.images),
            "mixed_precision": self.plan.mixed_precision,
            "gradient_checkpointing": self.plan.gradient_checkpointing,
            "started_at": session.started_at,
            "finished_at": finished.timestamp(),
            "finished_date": finished.date().isoformat(),
        }
        kohya = write_kohya(lora_path(out, self.spec.name), session.models, facts)
        diffusers = write_diffusers(out / "diffusers", pipeline_cls, session.models)
        reports = self.write_reports(session.step)
        self.ctx.artifact(kohya, "lora")
        self.ctx.artifact(diffusers, "lora-diffusers")
        for path in reports:
            self.ctx.artifact(path, _report_kind(path))
        return {
            "lora": str(kohya),
            "diffusers_lora": str(diffusers),
            "loss_csv": str(out / "loss.csv"),
            "loss_png": str(out / "loss.png"),
            "validation_images": [str(p) for p in reports if p.parent.name == "validation"],
            "steps": session.step,
            "final_loss": session.losses[-1][1] if session.losses else None,
            "model": ref.name,
            "kind": ref.kind,
            "rank": options.rank,
            "alpha": session.models.alpha,
            "repaired_shards": self.dataset.repaired,
            "memory_rung": STAGE.rung(self.ctx.memory_rung).name,
            "micro_batch": self.plan.micro_batch,
            "gradient_checkpointing": self.plan.gradient_checkpointing,
        }


def _report_kind(path: Path) -> str:
    if path.suffix == ".csv":
        return "loss-csv"
    if path.parent.name == "validation":
        return "validation-image"
    return "loss-plot"


_this_process: Any = None


def _process_rss() -> int:
    global _this_process
    if _this_process is None:
        import psutil

        _this_process = psutil.Process()
    return int(_this_process.memory_info().rss)


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
)
