"""What a 64×64 picture of one shape shows, read from pixel statistics alone.

The background is the colour of the picture's border; the shape is every pixel well away
from it. Its colour is the nearest named colour to the shape's median pixel, its place the
nearest named place to its bounding box's centre, and its shape the nearest of the drawn
shapes by two measures: how much of its bounding box it fills (square 1, circle π/4,
triangle ½, star about ⅓) and how low its mass sits in that box (a triangle's point is up).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dropkiln.stages.models.shapes_scenes import BACKGROUNDS, COLOURS, NEW_COLOURS, POSITIONS

if TYPE_CHECKING:
    from PIL import Image

PALETTE = {**COLOURS, **NEW_COLOURS}
SHAPE_MEASURES: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.5),
    "circle": (0.785, 0.5),
    "triangle": (0.54, 0.655),
    "star": (0.39, 0.55),
}
"""(fill of the bounding box, height of the mass centre in it from the top) per shape, as
drawn by shapes_scenes, measured on clean scenes (tests/stages/test_shapes_model.py)."""

_MIN_PIXELS = 12
_MIN_CONTRAST = 40.0


@dataclass(frozen=True)
class Detection:
    """The detector's reading of one picture (all None when no shape stands out)."""

    colour: str | None
    position: str | None
    shape: str | None
    fill: float = 0.0
    mass_height: float = 0.0
    background: str | None = None

    def matches(
        self,
        colour: str | None = None,
        position: str | None = None,
        shape: str | None = None,
    ) -> bool:
        """True if every attribute given is the one detected."""
        wanted = {"colour": colour, "position": position, "shape": shape}
        return all(value is None or getattr(self, key) == value for key, value in wanted.items())


def detect(image: Image.Image) -> Detection:
    """Read colour, place and shape of the one shape in ``image``."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=2)
    strongest = float(np.percentile(distance, 99.5))
    if strongest < _MIN_CONTRAST:
        return Detection(None, None, None, background=_nearest(background, BACKGROUNDS))
    mask = distance > max(_MIN_CONTRAST, strongest / 2)
    if int(mask.sum()) < _MIN_PIXELS:
        return Detection(None, None, None, background=_nearest(background, BACKGROUNDS))
    ys, xs = np.nonzero(mask)
    top, bottom = float(ys.min()), float(ys.max()) + 1
    left, right = float(xs.min()), float(xs.max()) + 1
    fill = float(mask.sum()) / ((bottom - top) * (right - left))
    mass_height = (float(ys.mean()) + 0.5 - top) / (bottom - top)
    centre = np.array([(left + right) / 2, (top + bottom) / 2])
    return Detection(
        colour=_nearest(np.median(pixels[mask], axis=0), PALETTE),
        position=min(POSITIONS, key=lambda p: float(np.linalg.norm(centre - POSITIONS[p]))),
        shape=min(SHAPE_MEASURES, key=lambda s: _shape_distance(fill, mass_height, s)),
        fill=fill,
        mass_height=mass_height,
        background=_nearest(background, BACKGROUNDS),
    )


def _shape_distance(fill: float, mass_height: float, shape: str) -> float:
    # mass height varies less than fill between shapes, so it weighs more per unit
    expected_fill, expected_height = SHAPE_MEASURES[shape]
    return (fill - expected_fill) ** 2 + (3 * (mass_height - expected_height)) ** 2


def _nearest(rgb: object, palette: dict[str, tuple[int, int, int]]) -> str:
    import numpy as np

    colour = np.asarray(rgb, dtype=np.float32)
    return min(palette, key=lambda name: float(np.linalg.norm(colour - np.array(palette[name]))))


def vae_readback(vae: Any, count: int = 40, seed: int = 5) -> dict[str, float]:
    """How often the detector reads a held-out scene's colour, place and shape off the VAE's
    reconstruction of it (from the latent mean), and (``concept``) a purple star's colour and
    shape together. The UNet draws through this decoder, so this is the ceiling of prompt
    following; purple, which no caption of the base model names, was the demo LoRA's first
    colour (README: "The demo's word")."""
    import numpy as np

    from dropkiln.stages.models.shapes_scenes import concept_scene, draw_scene, random_scene

    rng = np.random.Generator(np.random.PCG64(seed))
    scenes = [random_scene(rng, held_out=True) for _ in range(count)]
    concepts = [concept_scene(rng, "star", NEW_COLOURS["purple"])[0] for _ in range(count)]
    hits: Counter[str] = Counter()
    for scene, image in zip(scenes, reconstruct(vae, [draw_scene(s) for s in scenes]), strict=True):
        found = detect(image)
        hits.update(
            colour=found.colour == scene.colour,
            position=found.position == scene.position,
            shape=found.shape == scene.shape,
        )
    for image in reconstruct(vae, concepts):
        hits.update(concept=detect(image).matches(colour="purple", shape="star"))
    return {name: hits[name] / count for name in ("colour", "position", "shape", "concept")}


def reconstruct(vae: Any, images: list[Image.Image]) -> list[Image.Image]:
    """``images`` encoded to their latent means and decoded again."""
    import numpy as np
    import torch
    from PIL import Image

    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    with torch.no_grad():
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
    arrays = ((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(array) for array in arrays]
