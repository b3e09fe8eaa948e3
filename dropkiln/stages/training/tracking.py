"""What a run records for comparing runs: TensorBoard event files and a validation loss.

TensorBoard files go to OUTPUT/tensorboard/ (offline; ``tensorboard --logdir outputs/loras``
compares every run). A resumed run purges the events after its checkpoint's step, so the
curves are those of an undisturbed run.

The validation loss is the diffusion loss of a fixed set of images at fixed timesteps and a
fixed noise, with no gradient: the same inputs at every checkpoint, so its curve moves only
because the LoRA did. The images are held out of training with ``validation_holdout``;
otherwise they are the first training images (the curve then shows fit, not overfit).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import scalar

from dropkiln.options import TrainSettings
from dropkiln.stages.training.data import Batch, CachedDataset, CachedImage
from dropkiln.stages.training.losses import NoiseDraw
from dropkiln.stages.training.wandb_run import WandbRun

if TYPE_CHECKING:
    from dropkiln.stages.training.loop import Plan

Hyperparameters = dict[str, bool | int | float | str]

TENSORBOARD = "tensorboard"
VALIDATION_LOSS_IMAGES = 4
VALIDATION_LOSS_TIMESTEPS = 4
SMOOTHING_WINDOW = 20
STEPS_PER_HANDOVER = 100
"""Steps whose scalars wait to go to the writer's thread together (the writer itself puts
them in the file only every 2 minutes, and at each checkpoint)."""
_NOISE_SEED_OFFSET = 0x5EED


def smoothed(losses: Sequence[tuple[int, float, float]]) -> float:
    """Mean of the last SMOOTHING_WINDOW losses (a function of the history, so exact on resume)."""
    window = [row[1] for row in losses[-SMOOTHING_WINDOW:]]
    return sum(window) / len(window)


def validation_timesteps(options: TrainSettings, num_train_timesteps: int) -> list[int]:
    """Evenly spaced over the trained timestep range."""
    upper = min(options.timestep_max, num_train_timesteps) - 1
    count = VALIDATION_LOSS_TIMESTEPS
    return [round(options.timestep_min + (upper - options.timestep_min) * i / (count - 1))
            for i in range(count)]  # fmt: skip


def validation_batches(
    images: Sequence[CachedImage],
    dataset: CachedDataset,
    options: TrainSettings,
    num_train_timesteps: int,
    encode_on_the_fly: bool,
) -> list[Batch]:
    """One batch per image: the image at each fixed timestep, each with its fixed noise."""
    generator = torch.Generator().manual_seed(options.seed + _NOISE_SEED_OFFSET)
    timesteps = torch.tensor(validation_timesteps(options, num_train_timesteps))
    batches = []
    for image in images[:VALIDATION_LOSS_IMAGES]:
        count = len(timesteps)
        latents = dataset.latents(image, False).unsqueeze(0).float().repeat(count, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        device = latents.device
        cached = None
        if not encode_on_the_fly:
            cached = {k: v.unsqueeze(0).repeat(count, *[1] * v.dim())
                      for k, v in dataset.text_outputs(image.caption).items()}  # fmt: skip
        time_ids = dataset.time_ids(image, False)
        batches.append(
            Batch(
                latents,
                time_ids.unsqueeze(0).repeat(count, *[1] * time_ids.dim()),
                [image.caption] * count,
                cached,
                torch.ones(count, dtype=torch.float32, device=device),
                NoiseDraw(noise.to(device), timesteps.to(device), None),
            )
        )
    return batches


class RunTracker:
    """TensorBoard scalars, images and hyper-parameters of one run (and the same in a
    wandb run when one is configured: wandb_run.py)."""

    def __init__(
        self,
        folder: Path,
        resumed_at: int,
        hparams: Hyperparameters,
        wandb: WandbRun | None = None,
    ) -> None:
        self.folder = folder
        self.hparams = hparams
        self.wandb = wandb
        # purge_step drops events a killed attempt wrote after the checkpoint resumed from
        self.writer = SummaryWriter(
            log_dir=str(folder), purge_step=resumed_at + 1 if resumed_at else None
        )
        self._pending: list[tuple[Summary, int]] = []

    def step(self, step: int, losses: Sequence[tuple[int, float, float]], lr: float,
             grad_norm: float) -> None:  # fmt: skip
        values = {
            "loss/train": losses[-1][1],
            "loss/train_smoothed": smoothed(losses),
            "lr": lr,
            "grad_norm": grad_norm,
        }
        # One event holding the step's scalars, not one event each (add_scalar's way), and
        # the events of many steps handed over at once: each event handed over wakes the
        # writer's thread, which then takes the GIL from the training thread.
        merged = Summary(value=[v for tag, x in values.items() for v in scalar(tag, x).value])
        self._pending.append((merged, step))
        if len(self._pending) >= STEPS_PER_HANDOVER:
            self._hand_over()
        if self.wandb is not None:
            self.wandb.log(step, values)

    def _hand_over(self) -> None:
        # SummaryWriter has no public call for a ready Summary; its own add_scalar hands
        # one to this same file writer (torch is pinned in the lock, so this stays put)
        writer = self.writer._get_file_writer()
        for summary, step in self._pending:
            writer.add_summary(summary, step)
        self._pending.clear()

    def checkpoint(self, step: int, validation_loss: float | None, images: Sequence[Path]) -> None:
        self._hand_over()
        if validation_loss is not None:
            self.writer.add_scalar("loss/validation", validation_loss, step)
        for path in images:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"validation/{path.stem[-2:]}", pixels, step, dataformats="HWC")
        self.writer.flush()
        if self.wandb is not None:
            if validation_loss is not None:
                self.wandb.log(step, {"loss/validation": validation_loss})
            self.wandb.images(step, images)

    def finish(self, final_loss: float | None, validation_loss: float | None) -> None:
        metrics = {"hparam/final_loss": final_loss if final_loss is not None else float("nan")}
        if validation_loss is not None:
            metrics["hparam/validation_loss"] = validation_loss
        self._hand_over()
        self.writer.add_hparams(self.hparams, metrics, run_name="hparams")
        if self.wandb is not None:
            self.wandb.finish(metrics)
            self.wandb = None
        self.close()

    def close(self) -> None:
        self._hand_over()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def hyperparameters(options: TrainSettings, plan: Plan) -> Hyperparameters:
    """The settings TensorBoard's HPARAMS tab compares runs by (scalars and strings only)."""
    values: Hyperparameters = {}
    for key, value in options.model_dump().items():
        if isinstance(value, bool | int | float | str):
            values[key] = value
        elif value is None:
            values[key] = "none"
        else:
            values[key] = str(value)
    values["micro_batch"] = plan.micro_batch
    values["mixed_precision"] = plan.mixed_precision
    return values
