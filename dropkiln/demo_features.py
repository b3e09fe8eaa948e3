"""``dropkiln demo --full``: one prompt folder per generation feature, each giving its own
contact sheet (and the slideshow its video), dropped beside the demo's own files.

The inputs (a start image, a mask, a pose-like control and a reference) are drawn here
from the shapes scenes the tiny-shapes model was trained on, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

_SIZE = """\
[defaults]
steps = 20
width = 64
height = 64
"""

FEATURES: dict[str, str] = {
    "feature-batch": _SIZE
    + """batch_size = 4
[[image]]   # one entry, eight images: two prompts x four seeds, four a pipeline call
prompts = ["a red circle on a white background", "a blue square on a black background"]
vary = { seed = [1, 2, 3, 4] }
name = "batch"
""",
    "feature-img2img": _SIZE
    + """[[image]]
prompt = "a yellow triangle on a white background"
init_image = "start.png"
strength = 0.6
count = 4
name = "img2img"
""",
    "feature-inpaint": _SIZE
    + """[[image]]
prompt = "a green circle on a white background"
init_image = "start.png"
mask = "mask.png"
strength = 1.0
count = 4
name = "inpaint"
""",
    "feature-controlnets": _SIZE
    + """[[image]]
prompt = "a red square"
count = 2
name = "canny"
control = { image = "start.png", preprocess = "canny", scale = 1.0 }
[[image]]
prompt = "a red square"
count = 2
name = "two-controls"
control = [
  { image = "start.png", preprocess = "canny", scale = 0.8, end = 0.6 },
  { image = "shape.png", scale = 0.6, start = 0.2 },
]
""",
    "feature-reference": _SIZE
    + """[[image]]
prompt = "a shape on a background"
count = 2
name = "no-reference"
[[image]]
prompt = "a shape on a background"
count = 2
name = "reference"
reference = [{ image = "start.png", weight = 1.0 }, { image = "shape.png", weight = 0.5 }]
""",
    "feature-ken-burns": _SIZE
    + """[[image]]
prompts = ["a red circle on a white background", "a blue star on a black background",
           "a yellow triangle on a white background"]
name = "slide"
[video]
kind = "slideshow"
motion = "ken-burns"
zoom = 1.4
fps = 12
seconds_per_image = 1.0
""",
}
"""Prompt folder name -> prompt file; each folder also gets the input images."""


def write_feature_drops(staging: Path) -> list[Path]:
    """One ready prompt folder per feature under ``staging``, with its input images."""
    import numpy as np
    from PIL import Image

    from dropkiln.stages.models.shapes_detect import PALETTE
    from dropkiln.stages.models.shapes_scenes import concept_scene

    rng = np.random.Generator(np.random.PCG64(11))
    start, _ = concept_scene(rng, "circle", PALETTE["purple"])
    start = start.convert("RGB").resize((64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255  # white: repainted
    shape = np.zeros((64, 64, 3), np.uint8)
    shape[12:52, 20:44] = 255
    folders = []
    for name, text in FEATURES.items():
        folder = staging / name
        folder.mkdir(parents=True, exist_ok=True)
        start.save(folder / "start.png")
        Image.fromarray(mask).save(folder / "mask.png")
        Image.fromarray(shape).save(folder / "shape.png")
        (folder / "prompts.toml").write_text(text)
        folders.append(folder)
    return folders
