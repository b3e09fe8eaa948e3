"""What the demo shows at the end: the new concept before and after the LoRA, side by side,
and how often the pixel detector finds it in each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dropkiln.stages.base import atomic_path

CELL = 96
LINE = 14
"""Height of one line of title text."""


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
    """One picture: a titled row of images per model (base, then with the LoRA). Titles
    wrap to the picture's width (few seeds make a narrow picture), as contact sheet
    labels do."""
    from dropkiln.stages.generation.png_files import LABEL_MARGIN, wrap_label

    columns = max(len(images) for _, images in rows)
    width = columns * CELL
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def lines(text: str) -> list[str]:
        return wrap_label(text, font, measure, width - 2 * LABEL_MARGIN)

    header = lines(f'"{prompt}", seeds 1-{columns}')
    titles = [lines(title) for title, _ in rows]
    height = len(header) * LINE + sum(len(title) * LINE + CELL for title in titles) + 4
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    top = 2
    for line in header:
        draw.text((LABEL_MARGIN, top), line, fill=(235, 235, 235), font=font)
        top += LINE
    for title, (_, images) in zip(titles, rows, strict=True):
        for line in title:
            draw.text((LABEL_MARGIN, top), line, fill=(200, 200, 120), font=font)
            top += LINE
        for column, path in enumerate(images):
            with Image.open(path) as image:
                cell = image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            sheet.paste(cell, (column * CELL, top))
        top += CELL
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        sheet.save(temporary, format="PNG")
    return target
