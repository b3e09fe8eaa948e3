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
from typing import TYPE_CHECKING, Any

from dropkiln.stages.base import StageError
from dropkiln.stages.training.checkpoint import (
    capture_global_rng,
    read_checkpoint,
    restore_global_rng,
    write_checkpoint,
)

if TYPE_CHECKING:
    import torch

    from dropkiln.stages.training.adapters import TrainableModels


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (peft draws the initial LoRA weights from torch's)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(models: TrainableModels, options: Any, device: str) -> Any:
    """AdamW, Adafactor, or 8-bit AdamW (bitsandbytes on CUDA only)."""
    import torch

    groups = [{"params": models.parameters("unet"), "lr": options.learning_rate}]
    text_lr = options.text_encoder_learning_rate or options.learning_rate
    for component in ("text_encoder", "text_encoder_2"):
        params = models.parameters(component)
        if params:
            groups.append({"params": params, "lr": text_lr})
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=options.learning_rate)
    if options.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=options.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if not device.startswith("cuda"):
        raise StageError(f"optimizer adamw8bit needs a CUDA device (this job runs on {device})")
    try:
        import bitsandbytes
    except ImportError as exc:
        raise StageError("optimizer adamw8bit needs the bitsandbytes package") from exc
    return bitsandbytes.optim.AdamW8bit(groups, lr=options.learning_rate)


def build_lr_scheduler(optimizer: Any, options: Any) -> Any:
    from diffusers.optimization import get_scheduler

    name = options.lr_scheduler
    if name == "constant" and options.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=options.lr_warmup_steps,
        num_training_steps=options.steps,
    )


@dataclass
class TrainingSession:
    models: TrainableModels
    optimizer: Any
    lr_scheduler: Any
    ema: Any | None
    scaler: Any | None
    data_rng: Any
    """numpy Generator for flips and caption augmentation."""
    noise_generator: torch.Generator
    step: int = 0
    losses: list[tuple[int, float, float]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def start(cls, models: TrainableModels, options: Any, device: str, fp16: bool) -> Any:
        import numpy as np
        import torch
        from diffusers.training_utils import EMAModel

        optimizer = build_optimizer(models, options, device)
        ema = None
        if options.ema_decay is not None:
            ema = EMAModel(models.parameters(), decay=options.ema_decay)
        scaler = torch.amp.GradScaler("cuda") if fp16 else None
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
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "data_rng": self.data_rng.bit_generator.state,
            "noise_generator": self.noise_generator.get_state(),
            "global_rng": capture_global_rng(device),
            "losses": [list(row) for row in self.losses],
            "started_at": self.started_at,
        }

    def save(self, folder: Path, device: str) -> Path:
        return write_checkpoint(folder, self.state(device))

    def restore(self, folder: Path, device: str) -> None:
        """Load a checkpoint written by ``save`` into this (freshly started) session."""
        import torch

        state = read_checkpoint(folder)
        with torch.no_grad():
            for name, param in self.models.trainable.items():
                param.copy_(state["lora"][name])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(device=device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.data_rng.bit_generator.state = state["data_rng"]
        self.noise_generator.set_state(state["noise_generator"])
        restore_global_rng(state["global_rng"])
        self.step = int(state["step"])
        self.losses = [(int(s), float(loss), float(lr)) for s, loss, lr in state["losses"]]
        self.started_at = float(state["started_at"])
