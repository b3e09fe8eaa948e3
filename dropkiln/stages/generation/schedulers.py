"""Scheduler names of prompt files → diffusers schedulers, configured for the model."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerChoice:
    """A prompt-file scheduler: the diffusers class, its options and the A1111 sampler name."""

    class_name: str
    a1111_name: str
    options: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerChoice] = {
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler", {"use_karras_sigmas": False}),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    "dpm++ 2m": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++ 2m karras": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M Karras",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", "UniPC", {"use_karras_sigmas": False}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)

# What a v-prediction model trained with zero terminal SNR needs at inference
# (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
ZERO_SNR_OPTIONS = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}


def needs_zero_snr(base_config: Any) -> bool:
    """True for a v-prediction or zero-terminal-SNR model (from its scheduler config)."""
    config = dict(base_config)
    return bool(
        config.get("prediction_type") == "v_prediction" or config.get("rescale_betas_zero_snr")
    )


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler of that name built on the model's own scheduler config."""
    import diffusers

    choice = SCHEDULERS[name]
    cls = getattr(diffusers, choice.class_name)
    options = dict(choice.options)
    if needs_zero_snr(base_config):
        options.update(ZERO_SNR_OPTIONS)
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config(base_config, **{k: v for k, v in options.items() if k in accepted})


def a1111_sampler(name: str) -> str:
    """The sampler name A1111 and Civitai use in their ``parameters`` text."""
    return SCHEDULERS[name].a1111_name


# A1111's names for diffusers schedulers a model may ship with that prompt files do not offer
_OTHER_A1111_NAMES = {
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
}


def a1111_sampler_of(scheduler: Any) -> str:
    """The A1111 sampler name of a configured diffusers scheduler (class, Karras sigmas)."""
    class_name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for choice in SCHEDULERS.values():
        choice_karras = bool(choice.options.get("use_karras_sigmas", False))
        if choice.class_name == class_name and choice_karras == karras:
            return choice.a1111_name
    return _OTHER_A1111_NAMES.get(class_name, class_name)
