"""The VAE phases of ``tiny-shapes``' training: the codec learns to give back scenes in any
colour, then (optionally, ``decoder_steps``; off in the shipped recipe) its decoder alone
learns to give back their edges.

The first phase weighs the shape's pixels above the background's, so the shape and its
colour come back at all; but that weighting also makes a blob cheaper than a star (a
background pixel painted in the shape's colour costs a ninth of a shape pixel missed), so
its decoder fills the gaps between a star's points. The second phase weighs a margin of
background around the shape as much as the shape itself, on the decoder alone: the encoder,
and so every latent the UNet learns, stays as the first phase left it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dropkiln.stages.models.shapes_scenes import codec_scene, draw_scene, random_scene

if TYPE_CHECKING:
    import numpy as np
    import torch

    from dropkiln.stages.models.shapes_scenes import Scene
    from dropkiln.stages.models.train_tiny import Recipe

DECODER_SCENES_SEED = 1_000_003
"""Added to the recipe's seed for the decoder phase's own scene stream: the phases after it
draw exactly the scenes they drew before it existed."""


def scene_batch(
    rng: np.random.Generator, count: int, draw: Callable[..., Scene] = random_scene
) -> tuple[torch.Tensor, list[str]]:
    """``count`` scenes from ``draw`` as a [-1, 1] channels-last image batch, with captions."""
    import numpy as np
    import torch

    scenes = [draw(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(draw_scene(scene), dtype=np.float32) for scene in scenes])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    return batch.contiguous(memory_format=torch.channels_last), [s.caption for s in scenes]


def train_codec(vae: Any, recipe: Recipe, rng: np.random.Generator, log: Any) -> None:
    """Phase 1: encoder and decoder learn to reconstruct scenes from the posterior mean."""
    import torch

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.vae_steps)
    for step in range(recipe.vae_steps):
        images, _ = scene_batch(rng, recipe.vae_batch, codec_scene)
        posterior = vae.encode(images).latent_dist
        # The mean, not a sample: at this KL weight the posterior's spread stays near its
        # initial 1, as wide as the means' own, and a decoder fed samples learned one
        # colour per background. The UNet learns these means (encoding.encode_latents).
        reconstruction = vae.decode(posterior.mean).sample
        error, colour = reconstruction_errors(reconstruction, images, recipe.shape_weight)
        loss = error + recipe.colour_weight * colour + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            line = f"vae {step:5d} reconstruction {error.item():.5f} colour {colour.item():.5f}"
            print(f"{line} at {_clock()}", file=log, flush=True)
    vae.eval().requires_grad_(False)


def sharpen_decoder(vae: Any, recipe: Recipe, log: Any = sys.stdout) -> None:
    """Phase 2: the decoder (and its post-quant conv) learns with the shape's margin weighed
    as the shape, plus the error along its edge; the encoder is frozen, and the scenes come
    from their own seeded stream."""
    import numpy as np
    import torch

    if recipe.decoder_steps <= 0:
        return
    rng = np.random.Generator(np.random.PCG64(recipe.seed + DECODER_SCENES_SEED))
    generator = torch.Generator().manual_seed(recipe.seed + DECODER_SCENES_SEED)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=recipe.decoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.decoder_steps)
    vae.eval().requires_grad_(False)
    vae.decoder.train()
    for parameter in trained:
        parameter.requires_grad_(True)
    for step in range(recipe.decoder_steps):
        images, _ = scene_batch(rng, recipe.vae_batch, codec_scene)
        with torch.no_grad():
            means = vae.encode(images).latent_dist.mean
            # the UNet's latents are near the encoder's, not on them: a decoder taught the
            # exact means alone turned that slack into speckles and shifted colours
            noise = torch.randn(means.shape, generator=generator)
            means = means + recipe.latent_noise * means.std() * noise
        reconstruction = vae.decode(means).sample
        error, colour = reconstruction_errors(
            reconstruction, images, recipe.shape_weight, margin=recipe.edge_margin
        )
        edge = edge_error(reconstruction, images)
        loss = error + recipe.colour_weight * colour + recipe.edge_weight * edge
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.decoder_steps - 1:
            line = f"decoder {step:5d} reconstruction {error.item():.5f} edge {edge.item():.5f}"
            print(f"{line} at {_clock()}", file=log, flush=True)
    vae.eval().requires_grad_(False)


def reconstruction_errors(
    reconstruction: torch.Tensor, images: torch.Tensor, shape_weight: float, margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 error weighted toward the shape and ``margin`` pixels around it, L1 error of the
    shape's mean colour).

    The shape covers a few percent of the picture: unweighted, the background's pixels
    outvote it and the VAE gives back a blob in the background's colour; and a per-pixel
    error lets the colour drift toward its neighbours' (red and yellow both came back
    orange), which the error of the whole shape's mean colour pins. With a margin, the
    background next to the shape weighs as much as the shape: spilling over its edge costs
    what falling short of it does."""
    import torch

    mask = shape_mask(images)
    weighted = mask
    if margin > 0:
        weighted = torch.nn.functional.max_pool2d(mask, 2 * margin + 1, 1, margin)
    weights = 1.0 + shape_weight * weighted
    error = (weights * (reconstruction - images).abs()).mean() / weights.mean()
    area = mask.sum(dim=(2, 3)).clamp(min=1.0)
    drawn = (images * mask).sum(dim=(2, 3)) / area
    given = (reconstruction * mask).sum(dim=(2, 3)) / area
    return error, (given - drawn).abs().mean()


def edge_error(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean L1 error over the band a pixel either side of the shape's edge: a star's
    points and the gaps between them are all edge, and the whole-picture mean dilutes them."""
    import torch

    mask = shape_mask(images)
    pool = torch.nn.functional.max_pool2d
    band = pool(mask, 3, 1, 1) + pool(-mask, 3, 1, 1)  # dilated minus eroded
    return (band * (reconstruction - images).abs()).sum() / band.sum().clamp(min=1.0)


def shape_mask(images: torch.Tensor) -> torch.Tensor:
    """1 where a [-1, 1] scene differs from its background (its border's median), else 0."""
    import torch

    border = torch.cat(
        [images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2
    )
    background = border.median(dim=2).values[:, :, None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > 0.1).float()


def _clock() -> str:
    return time.strftime("%H:%M:%S")
