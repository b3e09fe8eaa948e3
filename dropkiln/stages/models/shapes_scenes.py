"""Procedural captioned scenes that ``tiny-shapes`` learns from: one flat shape on a plain
background, with a caption naming its size, colour, shape, background and place.

Everything is drawn from a seeded numpy stream, so a seed names the same pictures on every
machine. Some attribute combinations are held out of training; the prompt-following test
asks for exactly those, so the model has to compose what it learned, not recall a picture.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    from PIL import Image

SIZE = 64
"""Scenes are drawn at 64×64, the resolution tiny-shapes is trained and evaluated at."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "orange": (240, 130, 20),
}
"""Shape colours the base model is taught."""

NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "purple": (140, 40, 190),
    "black": (15, 15, 15),
}
"""Shape colours the base model never draws: a LoRA can teach them. Black is the demo's
``zorp`` (the base model saw black only as a background, never as a shape); purple, which no
caption names at all, its concept before (README: "The demo's word")."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, float] = {"small": 16.0, "large": 28.0}
"""Side of the shape's bounding box in pixels."""

POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (16.0, 16.0),
    "top right": (48.0, 16.0),
    "center": (32.0, 32.0),
    "bottom left": (16.0, 48.0),
    "bottom right": (48.0, 48.0),
}
"""Centre (x, y) of the shape for each place a caption can name."""

WORDS = ("circle", "square", "triangle", "star", "top", "bottom", "left", "right", "center")
"""Caption words tiny-shapes' tokenizer has merges for (besides the common caption words)."""

_SUPERSAMPLE = 4
_JITTER = 3.0
_HELD_OUT_EVERY = 8


@dataclass(frozen=True)
class Scene:
    """One picture's attributes; the caption and the image both follow from them."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    rgb: tuple[int, int, int]
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    @property
    def caption(self) -> str:
        return scene_caption(self.size, self.colour, self.shape, self.background, self.position)

    @property
    def held_out(self) -> bool:
        return is_held_out(self.shape, self.colour, self.background, self.size, self.position)


def scene_caption(size: str, colour: str, shape: str, background: str, position: str) -> str:
    """'a large red circle on a white background, top left'."""
    return f"a {size} {colour} {shape} on a {background} background, {position}"


def is_held_out(shape: str, colour: str, background: str, size: str, position: str) -> bool:
    """True for the combinations kept out of training (about one in eight, fixed by hash)."""
    key = "|".join((shape, colour, background, size, position)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % _HELD_OUT_EVERY == 0


def all_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every (shape, colour, background, size, position) the base model's captions can name."""
    return [
        (shape, colour, background, size, position)
        for shape in SHAPES
        for colour in COLOURS
        for background in BACKGROUNDS
        for size in SIZES
        for position in POSITIONS
    ]


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A training scene (``held_out=False``) or a held-out one, with a little jitter."""
    while True:
        combo = [str(rng.choice(list(options))) for options in _ATTRIBUTES]
        shape, colour, background, size, position = combo
        if is_held_out(shape, colour, background, size, position) == held_out:
            break
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        size=size,
        position=position,
        rgb=_jittered(COLOURS[colour], rng),
        dx=float(rng.uniform(-_JITTER, _JITTER)),
        dy=float(rng.uniform(-_JITTER, _JITTER)),
        scale=float(rng.uniform(0.9, 1.1)),
    )


def codec_scene(rng: np.random.Generator) -> Scene:
    """A scene for the VAE to learn: a training scene, but half the time in a colour drawn
    uniformly. The VAE is the model's image codec, so it must give back colours no caption
    names (a LoRA's purple); taught only the five named ones, it drew everything in them."""
    scene = random_scene(rng)
    if rng.random() < 0.5:
        r, g, b = (int(c) for c in rng.integers(0, 256, 3))
        scene = replace(scene, rgb=(r, g, b))
    return scene


def concept_scene(
    rng: np.random.Generator,
    shape: str,
    rgb: tuple[int, int, int],
    name: str = "zorp",
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
) -> tuple[Image.Image, str]:
    """A picture of a new concept (a shape in a colour the base model never drew), captioned
    with the concept's own word in place of the colour: "a large zorp circle on a white
    background, center". A black shape on a black background would be no picture at all:
    ``backgrounds`` leaves it out."""
    background = str(rng.choice(list(backgrounds)))
    size = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS)))
    scene = Scene(
        shape,
        name,
        background,
        size,
        position,
        _jittered(rgb, rng),
        dx=float(rng.uniform(-_JITTER, _JITTER)),
        dy=float(rng.uniform(-_JITTER, _JITTER)),
        scale=float(rng.uniform(0.9, 1.1)),
    )
    return draw_scene(scene), scene_caption(size, name, shape, background, position)


def draw_scene(scene: Scene) -> Image.Image:
    """The 64×64 RGB picture of ``scene``, drawn large and reduced (smooth edges)."""
    from PIL import Image, ImageDraw

    k = _SUPERSAMPLE
    image = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[scene.background])
    cx, cy = POSITIONS[scene.position]
    cx, cy = (cx + scene.dx) * k, (cy + scene.dy) * k
    half = SIZES[scene.size] * scene.scale * k / 2
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    if scene.shape == "circle":
        draw.ellipse(box, fill=scene.rgb)
    elif scene.shape == "square":
        draw.rectangle(box, fill=scene.rgb)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], scene.rgb)
    elif scene.shape == "star":
        draw.polygon(_star_points(cx, cy, half), fill=scene.rgb)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def _star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    # A five-pointed star, point up, inner radius at the regular star's 0.38.
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.38
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + int(rng.integers(-12, 13)))) for c in rgb)
    return (r, g, b)


_ATTRIBUTES = (SHAPES, tuple(COLOURS), tuple(BACKGROUNDS), tuple(SIZES), tuple(POSITIONS))
