"""Time per phase, from hooks on a pipeline's modules and on optimizer steps.

Hooks only record when a module's forward (or an optimizer step) starts and ends; the
phases are then cut from that timeline, so the code being measured is not changed. On a
GPU each hook synchronises first, so a span is the work done, not the work queued.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from types import TracebackType
from typing import Any

Span = tuple[str, float, float]


@dataclass
class PhaseTimeline:
    """Spans of named phases and boundary marks, on ``time.perf_counter``'s clock."""

    device: str = "cpu"
    spans: list[Span] = field(default_factory=list)
    marks: list[float] = field(default_factory=list)
    _open: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    _handles: list[Any] = field(default_factory=list)

    def now(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, phase: str) -> None:
        self._open[phase].append(self.now())

    def end(self, phase: str) -> None:
        started = self._open[phase].pop()
        self.spans.append((phase, started, self.now()))

    def mark(self) -> None:
        """A boundary between iterations (an image written, a training step done)."""
        self.marks.append(self.now())

    def watch_module(self, phase: str, module: Any) -> None:
        """Time every forward call of ``module`` as ``phase``."""
        self._handles.append(module.register_forward_pre_hook(lambda *_: self.start(phase)))
        self._handles.append(module.register_forward_hook(lambda *_: self.end(phase)))

    def watch_optimizer_steps(self, mark_after: bool = True) -> None:
        """Time every optimizer step (any optimizer) as ``optimizer``; mark after each."""
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        def after(*_: Any) -> None:
            self.end("optimizer")
            if mark_after:
                self.mark()

        self._handles.append(register_optimizer_step_pre_hook(lambda *_: self.start("optimizer")))
        self._handles.append(register_optimizer_step_post_hook(after))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> PhaseTimeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def windows(self) -> list[tuple[float, float, list[Span]]]:
        """(start, end, spans inside) for each interval between consecutive marks."""
        cut = []
        for start, end in pairwise(self.marks):
            inside = [s for s in self.spans if s[1] >= start and s[2] <= end]
            cut.append((start, end, inside))
        return cut


def watch_pipeline(timeline: PhaseTimeline, pipe: Any) -> None:
    """Text encoders, UNet and VAE decoder of a diffusers pipeline."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            timeline.watch_module("text_encode", encoder)
    timeline.watch_module("unet", pipe.unet)
    timeline.watch_module("vae_decode", pipe.vae.decoder)
    if getattr(pipe.vae, "post_quant_conv", None) is not None:
        timeline.watch_module("vae_decode", pipe.vae.post_quant_conv)


GENERATION_PHASES = ("text_encode", "denoise", "vae_decode", "other")
TRAINING_PHASES = ("data", "forward", "backward", "optimizer")


def generation_phase_rows(timeline: PhaseTimeline) -> list[dict[str, float]]:
    """Seconds per image: text encode, denoise (first to last UNet call), VAE decode, other."""
    rows = []
    for start, end, spans in timeline.windows():
        unet = [s for s in spans if s[0] == "unet"]
        row = {
            "text_encode": _sum(spans, "text_encode"),
            "denoise": (max(s[2] for s in unet) - min(s[1] for s in unet)) if unet else 0.0,
            "vae_decode": _sum(spans, "vae_decode"),
        }
        row["other"] = max(0.0, (end - start) - sum(row.values()))
        rows.append(row)
    return rows


def training_phase_rows(timeline: PhaseTimeline, skip: int = 0) -> list[dict[str, float]]:
    """Seconds per step: data (and bookkeeping between steps), forward, backward, optimizer."""
    rows = []
    for start, _end, spans in timeline.windows()[skip:]:
        forward = [s for s in spans if s[0] == "unet"]
        optimizer = [s for s in spans if s[0] == "optimizer"]
        if not forward or not optimizer:
            continue
        first_forward = min(s[1] for s in forward)
        optimizer_start = min(s[1] for s in optimizer)
        forward_s = _sum(spans, "unet")
        rows.append(
            {
                "data": first_forward - start,
                "forward": forward_s,
                # the loss, backward and gradient clipping: all between forward and step
                "backward": max(0.0, optimizer_start - first_forward - forward_s),
                "optimizer": _sum(spans, "optimizer"),
            }
        )
    return rows


def phase_summary(rows: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, Any]:
    """Mean seconds per iteration of each phase, and each phase's share of their sum."""
    if not rows:
        return {"iterations": 0}
    means = {name: round(sum(row[name] for row in rows) / len(rows), 6) for name in names}
    total = sum(means.values())
    shares = {name: round(value / total, 4) if total else 0.0 for name, value in means.items()}
    return {"iterations": len(rows), "mean_s": means, "share": shares}


def _sum(spans: Iterable[Span], phase: str) -> float:
    return sum(end - start for name, start, end in spans if name == phase)
