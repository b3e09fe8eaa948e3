"""Small datasets and prompt files that tests make for themselves."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 210, 40), (120, 40, 160)]


def write_dataset(
    folder: Path, count: int = 4, size: int = 64, toml: str | None = None, seed: int | None = None
) -> Path:
    """``count`` small PNGs of coloured shapes with same-stem tag captions.

    Different folder names (or seeds) give different content, so they are not duplicates.
    """
    folder.mkdir(parents=True, exist_ok=True)
    offset = seed if seed is not None else sum(folder.name.encode())
    for i in range(count):
        colour = PALETTE[(i + offset) % len(PALETTE)]
        colour = (colour[0], colour[1], (colour[2] + offset) % 256)
        wide = i % 2
        image = Image.new("RGB", (size + 32 * wide, size), "white")
        ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=colour)
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"shape, colour {i}, plain background")
    if toml is not None:
        (folder / "dataset.toml").write_text(toml)
    return folder
