"""The diffusion loss and its options, each a small function the training loop calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import compute_snr

from dropkiln.options import TrainSettings


def training_scheduler(
    pipeline_scheduler_config: Mapping[str, Any], options: TrainSettings
) -> DDPMScheduler:
    """The DDPM noise schedule of the model, with zero terminal SNR when asked."""
    config = dict(pipeline_scheduler_config)
    config.update(
        prediction_type=options.prediction_type,
        rescale_betas_zero_snr=options.zero_terminal_snr,
    )
    if options.zero_terminal_snr:
        config["timestep_spacing"] = "trailing"
    scheduler: DDPMScheduler = DDPMScheduler.from_config(config)
    return scheduler


def generation_scheduler(pipeline_scheduler: ConfigMixin, options: TrainSettings) -> ConfigMixin:
    """The pipeline's sampler, matched to what the LoRA was trained for."""
    if not options.zero_terminal_snr and options.prediction_type == "epsilon":
        return pipeline_scheduler
    config = dict(pipeline_scheduler.config)
    config["prediction_type"] = options.prediction_type
    if options.zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    matched = type(pipeline_scheduler).from_config(config)
    assert isinstance(matched, ConfigMixin)  # from_config returns a tuple only when asked
    return matched


@dataclass
class NoiseDraw:
    """Everything random about one batch, drawn at once so micro-batching cannot change it."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    perturbation: torch.Tensor | None


def draw_noise(
    latents: torch.Tensor,
    generator: torch.Generator,
    options: TrainSettings,
    num_train_timesteps: int,
) -> NoiseDraw:
    """Noise (with offset), timesteps in the allowed range and input perturbation."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if options.noise_offset > 0:
        offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        noise = noise + options.noise_offset * offset
    upper = min(options.timestep_max, num_train_timesteps)
    timesteps = torch.randint(options.timestep_min, upper, (shape[0],), generator=generator)
    perturbation = None
    if options.input_perturbation > 0:
        perturbation = options.input_perturbation * torch.randn(shape, generator=generator)
    return NoiseDraw(noise, timesteps, perturbation)


def noisy_latents_and_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, draw: NoiseDraw
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t from the (perturbed) noise, and what the UNet should predict from it."""
    noise_in = draw.noise if draw.perturbation is None else draw.noise + draw.perturbation
    # diffusers annotates timesteps as the legacy IntTensor; any integer tensor is meant
    timesteps = cast(torch.IntTensor, draw.timesteps)
    noisy = scheduler.add_noise(latents, noise_in, timesteps)
    if scheduler.config["prediction_type"] == "v_prediction":
        target = scheduler.get_velocity(latents, draw.noise, timesteps)
    else:
        target = draw.noise
    return noisy, target


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023); ones when γ is not set."""
    if gamma is None:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    snr: torch.Tensor = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config["prediction_type"] == "v_prediction":
        return clipped / (snr + 1)
    # With zero terminal SNR the last timestep has snr 0; its limit weight is 1.
    return torch.where(snr > 0, clipped / snr.clamp_min(1e-12), torch.ones_like(snr))


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32."""
    error = (prediction.float() - target.float()) ** 2
    return error.mean(dim=tuple(range(1, error.dim())))
