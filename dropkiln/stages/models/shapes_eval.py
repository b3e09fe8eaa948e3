"""Measure a ``tiny-shapes`` weights file: how well it follows held-out prompts, and what its
VAE gives back.

    python -m dropkiln.stages.models.shapes_eval [WEIGHTS] [--sets 3]

Set 0 is the test's: 40 held-out prompts picked with seed 0, rendered with seeds 0 to 39
(``test_tiny_shapes_follows_held_out_prompts_as_measured``). Set k picks with seed k and
renders with seeds 1000k to 1000k + 39, for a second and third look at the same weights.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

PROMPTS = 40
"""Held-out prompts per set."""


def prompt_following(pipe: Any, picks: int = 0, count: int = PROMPTS) -> dict[str, float]:
    """The share of ``count`` held-out prompts whose image the detector reads as captioned,
    per attribute (20 Euler steps, guidance 5, 64 px)."""
    import numpy as np
    import torch

    from dropkiln.stages.models.shapes_detect import detect
    from dropkiln.stages.models.shapes_scenes import all_combinations, is_held_out, scene_caption

    held = [combo for combo in all_combinations() if is_held_out(*combo)]
    chosen = np.random.Generator(np.random.PCG64(picks)).choice(len(held), count, False)
    right: Counter[str] = Counter()
    for number, pick in enumerate(chosen):
        shape, colour, background, size, position = held[pick]
        image = pipe(
            prompt=scene_caption(size, colour, shape, background, position),
            num_inference_steps=20,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(1000 * picks + number),
        ).images[0]
        found = detect(image)
        right.update(
            colour=found.colour == colour, position=found.position == position,
            shape=found.shape == shape,
        )  # fmt: skip
    return {name: right[name] / count for name in ("colour", "position", "shape")}


def weights_pipeline(path: Path) -> Any:
    """tiny-shapes' pipeline over the weights in ``path`` (a file the training script wrote)."""
    from dropkiln.stages.models.shapes_model import COMPONENTS, shapes_components
    from dropkiln.stages.models.train_tiny import shapes_pipeline

    components = shapes_components(path)
    for key in COMPONENTS:
        components[key].eval().requires_grad_(False)
    return shapes_pipeline(components)


def main(argv: list[str] | None = None) -> int:
    from dropkiln.stages.models.shapes_detect import vae_readback
    from dropkiln.stages.models.shapes_model import SHAPES_WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, nargs="?", default=SHAPES_WEIGHTS)
    parser.add_argument("--sets", type=int, default=3, help="sets of 40 held-out prompts")
    args = parser.parse_args(argv)
    pipe = weights_pipeline(args.weights)
    for picks in range(args.sets):
        found = prompt_following(pipe, picks)
        print(f"set {picks}: " + ", ".join(f"{k} {v:.1%}" for k, v in found.items()), flush=True)
    readback = vae_readback(pipe.vae)
    print("VAE read-back: " + ", ".join(f"{k} {v:.1%}" for k, v in readback.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
