"""The mutable state of a training run, and how it is checkpointed and restored exactly.

Everything a resumed run needs to continue bit for bit: LoRA weights, EMA, optimizer,
LR scheduler, gradient scaler, the run's own random generators (numpy for data choices,
torch for noise), the global RNGs, the data position and the loss history.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dropkiln.options import TrainSettings
from dropkiln.stages.base import StageError
from dropkiln.stages.training.adapters import TrainableModels
from dropkiln.stages.training.checkpoint import (
    RngState,
    capture_global_rng,
    read_checkpoint,
    restore_global_rng,
    write_checkpoint,
)


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (peft draws the initial LoRA weights from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(models: TrainableModels, options: TrainSettings, device: str) -> Optimizer:
    """The optimizer named by ``options.optimizer`` (OPTIMIZERS says what each needs)."""
    groups: list[dict[str, Any]] = [
        {"params": models.parameters("unet"), "lr": options.learning_rate}
    ]
    text_lr = options.text_encoder_learning_rate or options.learning_rate
    for component in ("text_encoder", "text_encoder_2"):
        params = models.parameters(component)
        if params:
            groups.append({"params": params, "lr": text_lr})
    lr = options.learning_rate
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if options.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        adafactor: Optimizer = Adafactor(
            groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False
        )
        return adafactor
    if options.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; learning_rate scales its estimate
        # (1.0 is the usual setting), as in kohya's and OneTrainer's Prodigy option.
        prodigy: Optimizer = Prodigy(
            groups, lr=lr, weight_decay=0.0, safeguard_warmup=options.lr_warmup_steps > 0
        )
        return prodigy
    if options.optimizer == "soap":
        from pytorch_optimizer import SOAP

        soap: Optimizer = SOAP(groups, lr=lr)
        return soap
    if not device.startswith("cuda"):
        raise StageError(f"optimizer adamw8bit needs a CUDA device (this job runs on {device})")
    try:
        import bitsandbytes
    except ImportError as exc:
        raise StageError(
            "optimizer adamw8bit needs the bitsandbytes package: pip install 'dropkiln[cuda]'"
        ) from exc
    adamw8bit: Optimizer = bitsandbytes.optim.AdamW8bit(groups, lr=lr)
    return adamw8bit


def build_lr_scheduler(optimizer: Optimizer, options: TrainSettings) -> LRScheduler:
    name: str = options.lr_scheduler
    if name == "constant" and options.lr_warmup_steps:
        name = "constant_with_warmup"
    scheduler: LRScheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=options.lr_warmup_steps,
        num_training_steps=options.steps,
    )
    return scheduler


@dataclass
class TrainingSession:
    models: TrainableModels
    optimizer: Optimizer
    lr_scheduler: LRScheduler
    ema: EMAModel | None
    scaler: torch.amp.GradScaler
    """Enabled for fp16 only; disabled, its calls pass the loss and the step straight through."""
    data_rng: np.random.Generator
    """For flips and caption augmentation."""
    noise_generator: torch.Generator
    step: int = 0
    losses: list[tuple[int, float, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of the fixed validation set at each checkpoint (tracking.py)."""
    started_at: float = field(default_factory=time.time)

    @classmethod
    def start(
        cls, models: TrainableModels, options: TrainSettings, device: str, fp16: bool
    ) -> TrainingSession:
        optimizer = build_optimizer(models, options, device)
        ema = None
        if options.ema_decay is not None:
            ema = EMAModel(models.parameters(), decay=options.ema_decay)
        # Built disabled rather than branched on, as nanoGPT's train.py does.
        scaler = torch.amp.GradScaler(torch.device(device).type, enabled=fp16)
        return cls(
            models=models,
            optimizer=optimizer,
            lr_scheduler=build_lr_scheduler(optimizer, options),
            ema=ema,
            scaler=scaler,
            data_rng=np.random.Generator(np.random.PCG64([options.seed, 1])),
            noise_generator=torch.Generator().manual_seed(options.seed),
        )

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The EMA weights in the LoRA for the duration (a no-op without EMA); restored exactly."""
        if self.ema is None:
            yield
            return
        params = self.models.parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    @property
    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def state(self, device: str) -> dict[str, Any]:
        return {
            "step": self.step,
            "lora": {name: p.detach() for name, p in self.models.trainable.items()},
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            # A disabled scaler has no state; None, as checkpoints have always said then.
            "scaler": self.scaler.state_dict() or None,
            "data_rng": self.data_rng.bit_generator.state,
            "noise_generator": self.noise_generator.get_state(),
            "global_rng": capture_global_rng(device),
            "losses": [list(row) for row in self.losses],
            "validation_losses": [list(row) for row in self.validation_losses],
            "started_at": self.started_at,
        }

    def save(self, folder: Path, device: str) -> Path:
        return write_checkpoint(folder, self.state(device))

    def restore(self, folder: Path, device: str) -> None:
        """Load a checkpoint written by ``save`` into this freshly started session, all or
        nothing: CheckpointUnusable leaves the LoRA weights and the global RNGs untouched.

        Everything is read and checked first. Then what lives only in this session
        (optimizer, scheduler, scaler, EMA) is loaded: a failure there is contained, as the
        caller throws the session away. The LoRA weights (shared with the pipeline) and the
        global RNGs come last, from values already checked to fit.
        """
        try:
            state = read_checkpoint(folder)
            lora = _checked_lora(state["lora"], self.models.trainable)
            _check_optimizer_state(state["optimizer"], self.optimizer)
            step = int(state["step"])
            losses = [(int(s), float(loss), float(lr)) for s, loss, lr in state["losses"]]
            started_at = float(state["started_at"])
            validation = [(int(s), float(v)) for s, v in state.get("validation_losses", [])]
            global_rng = state["global_rng"]
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
                self.ema.to(device=device)
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.data_rng.bit_generator.state = state["data_rng"]
            self.noise_generator.set_state(state["noise_generator"])
            _check_global_rng(global_rng)
            _restore_global_rng_or_nothing(global_rng, device)
        except CheckpointUnusable:
            raise
        except Exception as exc:  # whatever a damaged file makes a reader raise
            raise CheckpointUnusable(f"{type(exc).__name__}: {exc}") from exc
        with torch.no_grad():  # shapes and dtypes checked above: this cannot fail half-way
            for name, param in self.models.trainable.items():
                param.copy_(lora[name])
        self.step, self.losses, self.started_at = step, losses, started_at
        self.validation_losses = validation


class CheckpointUnusable(Exception):
    """A checkpoint that cannot be restored; the message says why."""


def _checked_lora(
    saved: dict[str, torch.Tensor], trainable: dict[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    if set(saved) != set(trainable):
        missing, extra = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
        raise CheckpointUnusable(
            f"LoRA weights do not match (missing {missing[:3]}, extra {extra[:3]})"
        )
    for name, param in trainable.items():
        if tuple(saved[name].shape) != tuple(param.shape):
            raise CheckpointUnusable(
                f"LoRA weight {name} is {tuple(saved[name].shape)}, not {tuple(param.shape)}"
            )
        if not saved[name].dtype.is_floating_point:
            raise CheckpointUnusable(f"LoRA weight {name} is {saved[name].dtype}")
    return saved


def _check_optimizer_state(saved: dict[str, Any], optimizer: Optimizer) -> None:
    """torch checks the parameter groups' sizes but not the shapes of the saved moments."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointUnusable("optimizer parameter groups do not match this LoRA")
    index = {i: params[n] for n, i in enumerate(i for g in groups for i in g["params"])}
    for key, moments in saved["state"].items():
        param = index.get(int(key))
        if param is None:
            raise CheckpointUnusable(f"optimizer state for unknown parameter {key}")
        for name, value in moments.items():
            shape = getattr(value, "shape", None)
            if shape is not None and len(shape) > 0 and tuple(shape) != tuple(param.shape):
                raise CheckpointUnusable(
                    f"optimizer {name} of parameter {key} has shape {tuple(shape)}"
                )


def _restore_global_rng_or_nothing(state: RngState, device: str) -> None:
    before = capture_global_rng(device)
    try:
        restore_global_rng(state)
    except Exception:
        restore_global_rng(before)
        raise


def _check_global_rng(state: RngState) -> None:
    if not isinstance(state["torch"], torch.Tensor) or state["torch"].dtype != torch.uint8:
        raise CheckpointUnusable("the saved torch RNG state is not a byte tensor")
    if not isinstance(state["python"], tuple | list) or len(state["python"]) != 3:
        raise CheckpointUnusable("the saved Python RNG state is malformed")
    if not isinstance(state["numpy"], dict):
        raise CheckpointUnusable("the saved numpy RNG state is malformed")
