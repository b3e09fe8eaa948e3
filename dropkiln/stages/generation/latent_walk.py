"""A latent walk: frames along spherical paths between the images' noise and prompts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class WalkFrame:
    """Frame ``index`` lies ``mix`` of the way from keyframe ``first`` to ``second``."""

    index: int
    first: int
    second: int
    mix: float


def walk_plan(keyframes: int, frames: int, loop: bool) -> list[WalkFrame]:
    """Frames evenly spaced along the path; an open walk ends on the last keyframe exactly,
    a loop comes back towards the first without repeating it."""
    if keyframes < 2 or frames < 2:
        raise ValueError("a latent walk needs two keyframes and two frames at least")
    segments = keyframes if loop else keyframes - 1
    plan = []
    for index in range(frames):
        position = index * segments / (frames if loop else frames - 1)
        first = min(int(position), segments - 1)
        plan.append(WalkFrame(index, first % keyframes, (first + 1) % keyframes, position - first))
    return plan


def slerp(a: torch.Tensor, b: torch.Tensor, mix: float) -> torch.Tensor:
    """Spherical interpolation: Gaussian noise keeps its norm (a straight mix would not)."""
    import torch

    if mix == 0.0:
        return a.clone()
    if mix == 1.0:
        return b.clone()
    a64, b64 = a.double().flatten(), b.double().flatten()
    cosine = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    angle = float(torch.arccos(cosine.clamp(-1.0, 1.0)))
    if abs(math.sin(angle)) < 1e-6:
        mixed = (1 - mix) * a64 + mix * b64
    else:
        mixed = (math.sin((1 - mix) * angle) * a64 + math.sin(mix * angle) * b64) / math.sin(angle)
    return mixed.reshape(a.shape).to(a.dtype)


def lerp_embeddings(a: dict[str, Any], b: dict[str, Any], mix: float) -> dict[str, Any]:
    """Prompt embeddings mixed linearly, tensor by tensor (None stays None)."""
    mixed: dict[str, Any] = {}
    for name, first in a.items():
        second = b[name]
        if first is None or second is None:
            mixed[name] = None
        elif mix in (0.0, 1.0):
            mixed[name] = first if mix == 0.0 else second
        else:
            mixed[name] = first + (second - first) * mix
    return mixed
