"""Which of the warm pipeline's models sit on the device in each phase of a training run.

After the cache stage, a step needs only the UNet: latents and caption embeddings come
from the cache. So while the steps run, the VAE and the text encoders wait in RAM
(unless the text encoders are trained, or captions change per step and are encoded on the
fly), and they come back for the validation images, which need them to encode prompts and
decode pictures. The warm pipeline is handed back with everything on its device.

On the CPU the device is RAM already: nothing moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dropkiln.options import TrainSettings
from dropkiln.stages.training.captions import needs_text_encoder
from dropkiln.stages.training.pipeline import TrainingPipeline

PARKED = "cpu"
"""Where idle models wait while the steps run."""


def idle_while_stepping(options: TrainSettings) -> list[str]:
    """The pipeline components a training step does not use."""
    idle = ["vae"]
    if not needs_text_encoder(options):
        idle += ["text_encoder", "text_encoder_2"]
    return idle


class DevicePhases:
    """Moves the idle components off the device for the steps, back for sampling."""

    def __init__(self, pipe: TrainingPipeline, idle: list[str], device: str) -> None:
        self.device = device
        self.idle: list[torch.nn.Module] = []
        if torch.device(device).type != "cpu":
            found = (getattr(pipe, name, None) for name in idle)
            self.idle = [model for model in found if isinstance(model, torch.nn.Module)]
        self._parked = False

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """The training phase: idle models in RAM for the duration, back afterwards."""
        self._move(PARKED)
        try:
            yield
        finally:
            self._move(self.device)

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Validation images inside the training phase: every model on the device."""
        parked = self._parked
        self._move(self.device)
        try:
            yield
        finally:
            if parked:
                self._move(PARKED)

    def _move(self, device: str) -> None:
        for model in self.idle:
            model.to(device)
        self._parked = device == PARKED and bool(self.idle)
