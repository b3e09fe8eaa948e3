"""The training loop: batch, noise, predict, loss, step; checkpoints and progress.

A step is ``gradient_accumulation`` bucket batches of ``batch_size`` images; each batch has
all its randomness drawn up front and is then cut into micro-batches, so the memory
ladder's smaller micro-batches see the same images, noise and timesteps.

Preemption is bounded by one micro-batch, not one step: ``should_stop`` is asked between
micro-batches too. A step stopped part-way is undone (gradients dropped, the random
generators put back to where the step began; weights and optimizer have not moved yet),
so the checkpoint is the state after the last whole step and a resume is bit-identical.
Validation images ask before each image; a checkpoint whose images were cut short is
recorded with ``reports_due`` and the resumed run makes them first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from dropkiln.stages.base import StageContext, StageStopped
from dropkiln.stages.fault_hooks import inside, middle_block
from dropkiln.stages.generation.png_files import model_label
from dropkiln.stages.models import ModelRef, checkpoint_hashes
from dropkiln.stages.models.encoding import encode_captions
from dropkiln.stages.training.checkpoint import (
    RngState,
    capture_global_rng,
    prune_checkpoints,
    restore_global_rng,
)
from dropkiln.stages.training.data import (
    Batch,
    CachedDataset,
    CachedImage,
    DataOrder,
    assemble_batch,
)
from dropkiln.stages.training.exports import LoraExports
from dropkiln.stages.training.losses import (
    generation_scheduler,
    min_snr_weights,
    noisy_latents_and_target,
    per_sample_mse,
)
from dropkiln.stages.training.phases import DevicePhases
from dropkiln.stages.training.pipeline import TrainingPipeline
from dropkiln.stages.training.prefetch import ShardPrefetch
from dropkiln.stages.training.report import (
    CONTACT_SHEET,
    ReportsStopped,
    ValidationModel,
    validation_images,
    validation_sheet,
    write_loss_csv,
    write_loss_plot,
)
from dropkiln.stages.training.session import TrainingSession
from dropkiln.stages.training.tracking import RunTracker, validation_batches

if TYPE_CHECKING:
    from dropkiln.stages.cache import ShardRef
    from dropkiln.stages.train import TrainSpec

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Plan:
    """How this attempt runs, from the settings and the memory rung."""

    micro_batch: int
    gradient_checkpointing: bool
    device: str
    weight_dtype: torch.dtype
    autocast: bool
    fp16: bool
    mixed_precision: str


@dataclass
class TrainingLoop:
    """One attempt's training: steps, checkpoints, progress and reports."""

    spec: TrainSpec
    ctx: StageContext
    plan: Plan
    pipe: TrainingPipeline
    session: TrainingSession
    dataset: CachedDataset
    order: DataOrder
    scheduler: DDPMScheduler
    on_the_fly: bool
    model: ModelRef
    """The model trained on (its name and checkpoint hash go into validation PNGs)."""
    exports: LoraExports
    """Writes the LoRA file of each checkpoint and the final one."""
    tracker: RunTracker
    """TensorBoard event files."""
    validation_set: list[CachedImage]
    """The images of the validation loss (held out, or the first training images)."""
    phases: DevicePhases
    """Which models are on the device while stepping and while sampling."""
    grad_norm: float = 0.0
    """The last step's gradient norm, before clipping."""
    prefetch: ShardPrefetch | None = None
    """Reads the next batches' shards while a step runs (set while ``run`` runs)."""
    _measuring: bool = False
    _memory: int = 0
    _memory_at: float = -math.inf

    def run(self) -> None:
        accumulation = self.spec.options.gradient_accumulation
        with_text = not self.on_the_fly

        def refs_at(position: int) -> list[ShardRef]:
            return self.dataset.shards_of(self.order.batch(position), with_text)

        prefetch = ShardPrefetch(self.dataset.shards, refs_at, self.session.step * accumulation)
        with (
            self.phases.stepping(),
            inside(middle_block(self.pipe.unet), self._in_forward, self._in_backward),
            prefetch,
        ):
            self.prefetch = prefetch
            try:
                self._run()
            finally:
                self.prefetch = None

    def _in_forward(self) -> None:
        if not self._measuring:  # the validation loss's forwards are not training's
            self.ctx.fault("train.forward")

    def _in_backward(self) -> None:
        self.ctx.fault("train.backward")

    def _run(self) -> None:
        options = self.spec.options
        total = options.steps
        self._finish_due_reports()
        started, first_step = time.perf_counter(), self.session.step
        while self.session.step < total:
            self.ctx.fault("train.step")
            try:
                loss = self.train_step()
            except _StepAbandoned:
                self.checkpoint(reports=False)
                step = self.session.step
                message = f"training stopped during step {step + 1} (step {step} saved)"
                raise StageStopped(message) from None
            step = self.session.step
            self.session.losses.append((step, loss, self.session.lr))
            rate = (step - first_step) / max(time.perf_counter() - started, 1e-9)
            self.ctx.progress(
                step, total, loss=loss, lr=self.session.lr, it_s=rate, memory=self.memory()
            )
            self.tracker.step(step, self.session.losses, self.session.lr, self.grad_norm)
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
        options, session = self.spec.options, self.session
        first = session.step * options.gradient_accumulation
        positions = range(first, first + options.gradient_accumulation)
        # A stop is obeyed between micro-batches, so only a step of several can be undone;
        # the generators' states are copied for that undo alone.
        size = self.plan.micro_batch
        undoable = sum(-(-len(self.order.batch(p)) // size) for p in positions) > 1
        before = self._random_state() if undoable else None
        batches = [self._assemble(position) for position in positions]
        samples = sum(len(batch) for batch in batches)
        step_loss = 0.0
        micro_batches = 0
        for batch in batches:
            for start in range(0, len(batch), self.plan.micro_batch):
                if micro_batches and self.ctx.should_stop():
                    assert before is not None  # a second micro-batch: the step is undoable
                    self._undo_step(before)
                    raise _StepAbandoned
                micro_batches += 1
                micro = batch.rows(start, start + self.plan.micro_batch)
                loss = self.micro_batch_loss(micro) / samples
                session.scaler.scale(loss).backward()
                step_loss += float(loss.detach())
        params = session.models.parameters()
        session.scaler.unscale_(session.optimizer)
        if options.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.grad_norm = float(norm)
        session.scaler.step(session.optimizer)
        session.scaler.update()
        session.lr_scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
        if session.ema is not None:
            session.ema.step(params)
        session.step += 1
        return step_loss

    def _assemble(self, position: int) -> Batch:
        """The batch at ``position``, its shards from the prefetch when it has them."""
        if self.prefetch is not None:
            self.dataset.prefetched = self.prefetch.take(position)
        try:
            return assemble_batch(
                self.dataset,
                self.order.batch(position),
                self.session.data_rng,
                self.session.noise_generator,
                self.spec.options,
                self.scheduler.config["num_train_timesteps"],
                self.on_the_fly,
            )
        finally:
            self.dataset.prefetched = {}

    def _random_state(self) -> tuple[Mapping[str, Any], torch.Tensor, RngState]:
        session = self.session
        return (
            session.data_rng.bit_generator.state,
            session.noise_generator.get_state(),
            capture_global_rng(self.plan.device),
        )

    def _undo_step(self, before: tuple[Mapping[str, Any], torch.Tensor, RngState]) -> None:
        data_rng, noise, global_rng = before
        self.session.optimizer.zero_grad(set_to_none=True)
        self.session.data_rng.bit_generator.state = data_rng
        self.session.noise_generator.set_state(noise)
        restore_global_rng(global_rng)

    def micro_batch_loss(self, batch: Batch) -> torch.Tensor:
        """Sum over the micro-batch of each image's weighted diffusion loss."""
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
                self._memory = int(torch.cuda.memory_allocated(self.plan.device))
            else:
                self._memory = _process_rss()
        return self._memory

    def checkpoint(self, reports: bool) -> None:
        self.ctx.fault("train.checkpoint")
        step = self.session.step
        stopped = None
        if reports:
            # Before the checkpoint is recorded: a run resumed from this step would never
            # come back to write them (after a kill in between, they are made again).
            # The step's LoRA and its validation images show the same (EMA) weights, as
            # the final file and the final images do.
            # Recorded as artifacts when the job finishes, once keep_loras has pruned: every
            # recorded artifact stays on disk (store check verifies them).
            with self.session.averaged_weights():
                self.exports.write_step(self.session, step)
            self.exports.prune(self.spec.options.keep_loras)
            try:
                with self.session.averaged_weights():
                    self.measure_validation_loss(step)
                    self.write_reports(step, stoppable=True)
            except ReportsStopped as exc:
                stopped = exc
        relative = f"{CHECKPOINTS}/step-{step:07d}"
        folder = self.session.save(self.ctx.work_dir / relative, self.ctx.device)
        state: dict[str, Any] = {"checkpoint": relative, "step": step}
        if stopped is not None:
            state["reports_due"] = True
        self.ctx.checkpoint(state)
        prune_checkpoints(self.ctx.work_dir / CHECKPOINTS, keep=folder)
        if stopped is not None:
            raise StageStopped(f"training stopped at step {step}: {stopped}")

    def _finish_due_reports(self) -> None:
        """The reports of a checkpoint whose validation images a stop cut short."""
        saved = self.ctx.resume_state() or {}
        if not saved.get("reports_due") or saved.get("step") != self.session.step:
            return
        try:
            with self.session.averaged_weights():
                self.write_reports(self.session.step, stoppable=True)
        except ReportsStopped as exc:
            raise StageStopped(f"training stopped at step {self.session.step}: {exc}") from exc
        self.ctx.checkpoint({"checkpoint": saved["checkpoint"], "step": saved["step"]})

    def write_reports(self, step: int, stoppable: bool = False) -> list[Path]:
        """Loss curve files, and validation images when there are prompts."""
        out = Path(self.spec.output_dir)
        options = self.spec.options
        losses, validation = self.session.losses, self.session.validation_losses
        written = [
            write_loss_csv(out / "loss.csv", losses, validation),
            write_loss_plot(out / "loss.png", losses, f"{self.spec.name}: loss", validation),
        ]
        if options.validation_prompts:
            self.pipe.unet.eval()
            try:
                with self.phases.sampling():
                    written += validation_images(
                        self.pipe,
                        options.validation_prompts,
                        self.dataset.resolution(),
                        options.seed,
                        generation_scheduler(self.pipe.scheduler, options),
                        out / "validation",
                        step,
                        ValidationModel(model_label(self.model.name),
                                        checkpoint_hashes(self.model).sha256),
                        self.ctx.should_stop if stoppable else lambda: False,
                    )  # fmt: skip
            finally:
                self.pipe.unet.train()
            written.append(
                validation_sheet(out / "validation", CONTACT_SHEET, options.validation_prompts)
            )
        images = [p for p in written if p.parent.name == "validation" and p.name != CONTACT_SHEET]
        held = dict(validation)
        self.tracker.checkpoint(step, held.get(step), images)
        return written

    def measure_validation_loss(self, step: int) -> float:
        """The loss of the fixed validation set (tracking.py) with the weights as they are now."""
        if self.session.validation_losses and self.session.validation_losses[-1][0] == step:
            return self.session.validation_losses[-1][1]
        batches = validation_batches(
            self.validation_set,
            self.dataset,
            self.spec.options,
            self.scheduler.config["num_train_timesteps"],
            self.on_the_fly,
        )
        total, count = 0.0, 0
        self.pipe.unet.eval()
        self._measuring = True
        try:
            with torch.no_grad():
                for batch in batches:
                    total += float(self.micro_batch_loss(batch))
                    count += len(batch)
        finally:
            self._measuring = False
            self.pipe.unet.train()
        value = total / max(count, 1)
        self.session.validation_losses.append((step, value))
        return value


class _StepAbandoned(Exception):
    """A stop request between two micro-batches: the step was undone."""


_this_process: psutil.Process | None = None


def _process_rss() -> int:
    global _this_process
    if _this_process is None:
        _this_process = psutil.Process()
    return int(_this_process.memory_info().rss)
