"""The text phase of ``tiny-shapes``' training: the seeded text encoders learn to tell the
caption words apart before the UNet listens to them.

Untrained, two captions that differ in one word ("red" for "blue") encode almost alike: the
seeded embeddings are small and the end token's state is mostly an average over the whole
caption. The UNet's own gradient moves the encoders too slowly to follow prompts on a CPU
budget, so linear heads first read every attribute of the scene back from exactly what the
UNet will get (the pooled embedding, and the mean of the token states it cross-attends to),
and are then thrown away.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from dropkiln.stages.models.shapes_scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
"""What a caption names, each with the words it can take."""


def separate_caption_words(
    pipe: Any,
    steps: tuple[int, int, float],
    draw: Callable[[], Scene],
    log: Any = sys.stdout,
) -> None:
    """Train ``pipe``'s two text encoders for ``steps`` = (steps, batch, learning rate) on
    the captions of scenes from ``draw`` (their pictures are never drawn)."""
    import torch

    count, batch, learning_rate = steps
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    pooled_width = pipe.text_encoder_2.config.projection_dim
    token_width = sum(encoder.config.hidden_size for encoder in encoders)
    heads = torch.nn.ModuleDict(
        {
            f"{source}_{name}": torch.nn.Linear(width, len(options))
            for source, width in (("pooled", pooled_width), ("tokens", token_width))
            for name, options in ATTRIBUTES.items()
        }
    )
    parameters = [*heads.parameters(), *(p for e in encoders for p in e.parameters())]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    for encoder in encoders:
        encoder.train().requires_grad_(True)
    for step in range(count):
        scenes = [draw() for _ in range(batch)]
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=[scene.caption for scene in scenes], device="cpu",
            num_images_per_prompt=1, do_classifier_free_guidance=False,
        )  # fmt: skip
        features = {"pooled": pooled, "tokens": embeds.mean(dim=1)}
        loss = torch.zeros(())
        for name, options in ATTRIBUTES.items():
            labels = torch.tensor([options.index(getattr(scene, name)) for scene in scenes])
            for source, feature in features.items():
                logits = heads[f"{source}_{name}"](feature)
                loss = loss + torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == count - 1:
            clock = time.strftime("%H:%M:%S")
            print(f"text {step:5d} loss {loss.item():.5f} at {clock}", file=log, flush=True)
    for encoder in encoders:
        encoder.eval().requires_grad_(False)
