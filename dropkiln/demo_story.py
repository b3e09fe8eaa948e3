"""What the demo shows at the end: the new concept before and after the LoRA, side by side,
and how often the pixel detector finds it in each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dropkiln.stages.base import atomic_path

CELL = 96
HEADER = 16


def rendered_images(folder: Path) -> list[Path]:
    """A generate output folder's images in prompt order (the contact sheet left out)."""
    return sorted(p for p in folder.glob("*.png") if p.name != "contact-sheet.png")


def concept_hits(images: Sequence[Path], colour: str, shape: str) -> int:
    """How many of ``images`` the detector reads as a ``colour`` ``shape``."""
    from dropkiln.stages.models.shapes_detect import detect

    hits = 0
    for path in images:
        with Image.open(path) as image:
            hits += detect(image).matches(colour=colour, shape=shape)
    return hits


def before_after_picture(
    rows: Sequence[tuple[str, Sequence[Path]]], prompt: str, target: Path
) -> Path:
    """One picture: a titled row of images per model (base, then with the LoRA)."""
    columns = max(len(images) for _, images in rows)
    width = columns * CELL
    height = HEADER + len(rows) * (HEADER + CELL)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((3, 2), f'"{prompt}", seeds 1-{columns}', fill=(235, 235, 235), font=font)
    for number, (title, images) in enumerate(rows):
        top = HEADER + number * (HEADER + CELL)
        draw.text((3, top + 2), title, fill=(200, 200, 120), font=font)
        for column, path in enumerate(images):
            with Image.open(path) as image:
                cell = image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            sheet.paste(cell, (column * CELL, top + HEADER))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        sheet.save(temporary, format="PNG")
    return target
