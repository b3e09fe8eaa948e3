"""What a training run shows people: the loss curve and validation images."""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from diffusers.configuration_utils import ConfigMixin
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from dropkiln.stages.base import write_atomic
from dropkiln.stages.generation.png_files import THUMB_SIDE, infotext, write_png
from dropkiln.stages.generation.schedulers import a1111_sampler_of
from dropkiln.stages.training.checkpoint import capture_global_rng, restore_global_rng
from dropkiln.stages.training.pipeline import TrainingPipeline

VALIDATION_STEPS = 20
VALIDATION_GUIDANCE = 5.0


class ReportsStopped(Exception):
    """Validation images were cut short by a stop request (cancel, preemption, shutdown)."""


def write_loss_csv(
    path: Path,
    losses: Sequence[tuple[int, float, float]],
    validation: Sequence[tuple[int, float]] = (),
) -> Path:
    """step,loss,lr,validation_loss; the validation loss only on checkpoint steps."""
    held = dict(validation)
    lines = ["step,loss,lr,validation_loss"] + [
        f"{step},{loss:.6g},{lr:.6g}," + (f"{held[step]:.6g}" if step in held else "")
        for step, loss, lr in losses
    ]
    return write_atomic(path, "\n".join(lines) + "\n")


def write_loss_plot(
    path: Path,
    losses: Sequence[tuple[int, float, float]],
    title: str,
    validation: Sequence[tuple[int, float]] = (),
) -> Path:
    """A PNG of the loss per step, its running mean, and the validation loss beside them."""
    matplotlib.use("Agg")
    steps = [row[0] for row in losses]
    values = [row[1] for row in losses]
    window = max(1, len(values) // 20)
    sums = [0.0, *itertools.accumulate(values)]  # running sums: O(steps), not O(steps × window)
    smooth = [(sums[i + 1] - sums[max(0, i - window + 1)]) / min(i + 1, window)
              for i in range(len(values))]  # fmt: skip
    figure = Figure(figsize=(7, 3.5), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, values, color="#9ab", linewidth=0.8, label="loss")
    axes.plot(steps, smooth, color="#c40", linewidth=1.6, label=f"mean of {window}")
    if validation:
        axes.plot(
            [row[0] for row in validation],
            [row[1] for row in validation],
            color="#26a",
            linewidth=1.6,
            marker="o",
            label="validation",
        )
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend(loc="upper right")
    axes.grid(alpha=0.3)
    # Fixed margins: tight_layout drew the whole figure once more only to measure it, which
    # made the plot, redrawn at every checkpoint, twice as slow.
    figure.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.15)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(path, buffer.getvalue())


@dataclass(frozen=True)
class ValidationModel:
    """What a validation PNG says about the checkpoint: A1111's ``Model`` and the sha256."""

    label: str
    sha256: str


def validation_images(
    pipe: TrainingPipeline,
    prompts: Sequence[str],
    size: tuple[int, int],
    seed: int,
    scheduler: ConfigMixin,
    folder: Path,
    step: int,
    model: ValidationModel,
    stop: Callable[[], bool] = lambda: False,
) -> list[Path]:
    """One image per validation prompt with the LoRA as it is now; global RNG untouched.

    Each carries A1111's ``parameters`` text with the fields of a generated image. ``stop``
    is asked before each image: a long validation never holds up a preemption by more than
    one image (ReportsStopped)."""
    device = str(pipe.device)
    saved_rng = capture_global_rng(device)
    original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    paths = []
    try:
        for number, prompt in enumerate(prompts):
            if stop():
                raise ReportsStopped(f"stopped before validation image {number} of step {step}")
            generator = torch.Generator().manual_seed(seed + number)
            with torch.no_grad():
                image = pipe(
                    prompt,
                    width=size[0],
                    height=size[1],
                    num_inference_steps=VALIDATION_STEPS,
                    guidance_scale=VALIDATION_GUIDANCE,
                    generator=generator,
                ).images[0]
            fields = [
                ("Steps", VALIDATION_STEPS),
                ("Sampler", a1111_sampler_of(scheduler)),
                ("CFG scale", f"{VALIDATION_GUIDANCE:g}"),
                ("Seed", seed + number),
                ("Size", f"{size[0]}x{size[1]}"),
                ("Model hash", model.sha256[:10]),
                ("Model", model.label),
                ("LoRA step", step),
                ("Version", "dropkiln"),
            ]
            info = PngInfo()
            info.add_text("parameters", infotext(prompt, "", fields))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=info)
            target = folder / f"step-{step:06d}-{number:02d}.png"
            paths.append(write_atomic(target, buffer.getvalue()))
    finally:
        pipe.scheduler = original_scheduler
        restore_global_rng(saved_rng)
    return paths


CONTACT_SHEET = "contact-sheet.png"
_VALIDATION_IMAGE = re.compile(r"^step-(\d{6,})-(\d{2,})\.png$")
_HEADER = 16


def validation_sheet(folder: Path, name: str, prompts: Sequence[str]) -> Path:
    """One picture: a row per validation prompt, a column per step, each cell that step's image.

    Built from the images on disk, so a resumed run's sheet also has the steps before the kill.
    """
    cells: dict[tuple[int, int], Path] = {}
    for found in folder.glob("step-*.png"):
        match = _VALIDATION_IMAGE.match(found.name)
        if match and int(match[2]) < len(prompts):
            cells[(int(match[1]), int(match[2]))] = found
    steps = sorted({step for step, _ in cells})
    side = THUMB_SIDE // 2
    label_width = 2 * side
    sheet = Image.new(
        "RGB",
        (label_width + side * max(1, len(steps)), _HEADER + side * len(prompts)),
        (24, 24, 24),
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for column, step in enumerate(steps):
        draw.text(
            (label_width + column * side + 3, 2), f"step {step}", fill=(220, 220, 220), font=font
        )
    for row, prompt in enumerate(prompts):
        y = _HEADER + row * side
        for line, start in enumerate(range(0, min(len(prompt), 120), 24)):
            draw.text(
                (3, y + 2 + 12 * line), prompt[start : start + 24], fill=(220, 220, 220), font=font
            )
        for column, step in enumerate(steps):
            cell = cells.get((step, row))
            if cell is None:
                continue
            with Image.open(cell) as image:
                thumb = ImageOps.contain(
                    image.convert("RGB"), (side, side), Image.Resampling.LANCZOS
                )
            x = label_width + column * side
            sheet.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
    return write_png(sheet, folder / name)
