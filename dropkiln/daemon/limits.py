"""Operator caps (dropkiln.toml ``[limits]``) on what one drop may ask for.

Anyone who can drop can queue work, so a dataset.toml or a prompt file must not be able
to tie up the GPU for weeks or fill the disk with checkpoints. A cap applies to a value the
drop set itself: dropkiln.toml's own defaults are the operator's choice and always pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dropkiln.config import LimitsSettings, Settings

if TYPE_CHECKING:
    from dropkiln.stages.dataset import DatasetOptions


class OverLimit(ValueError):
    """The message names the key, the value asked for and the cap."""


# (section, key, cap name, the value is over the cap when …)
_DATASET_CAPS: tuple[tuple[str, str, str, Callable[[int, int], bool]], ...] = (
    ("train", "steps", "max_steps", lambda value, cap: value > cap),
    ("train", "batch_size", "max_batch_size", lambda value, cap: value > cap),
    ("train", "gradient_accumulation", "max_gradient_accumulation", lambda v, cap: v > cap),
    ("train", "checkpoint_every", "min_checkpoint_every", lambda value, cap: value < cap),
    ("train", "rank", "max_rank", lambda value, cap: value > cap),
    ("bucket", "resolution", "max_resolution", lambda value, cap: value > cap),
)


def _refusal(label: str, key: str, value: int, cap_name: str, cap: int) -> OverLimit:
    direction = "below" if cap_name.startswith("min_") else "over"
    return OverLimit(
        f"{label}: {key} = {value} is {direction} the operator's cap "
        f"limits.{cap_name} = {cap} (set in dropkiln.toml; a drop cannot change it)"
    )


def check_dataset(settings: Settings, options: DatasetOptions, label: str) -> None:
    """Refuse a dataset whose own options go past a cap."""
    limits: LimitsSettings = settings.limits
    for section, key, cap_name, breaks in _DATASET_CAPS:
        value = getattr(getattr(options, section), key)
        operator_default = getattr(getattr(settings, section), key)
        cap = getattr(limits, cap_name)
        if value != operator_default and breaks(value, cap):
            raise _refusal(label, key, value, cap_name, cap)


def check_prompts(settings: Settings, prompt_file: Any, label: str) -> None:
    """Refuse a prompt file that asks for more images or steps than the caps allow."""
    limits = settings.limits
    total = sum(image.count for image in prompt_file.images)
    if total > limits.max_images:
        raise _refusal(label, "images (count, in all)", total, "max_images", limits.max_images)
    for number, image in enumerate(prompt_file.images):
        steps = image.steps
        if steps != settings.generate.steps and steps > limits.max_generate_steps:
            key = f"image[{number}].steps"
            raise _refusal(label, key, steps, "max_generate_steps", limits.max_generate_steps)
