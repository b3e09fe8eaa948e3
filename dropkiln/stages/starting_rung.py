"""The first memory rung of a training or generate job, from device memory and an estimate.

A first job on a small card should not have to run out of memory to find its rung. The
estimate adds up what a LoRA training step holds on the device, per rung, for the model
family, resolution, batch, rank and optimizer, and picks the first rung that fits the
memory available (free memory plus dropkiln's own warm pipelines, which are reused or
evicted) with some headroom. The executor then refines it with the remembered rung
(``store.queries.rung_memory``). The figures are estimates for half-precision frozen
weights on CUDA, not measurements; the ladder still steps down when they are wrong, and a
rung that is too safe is re-probed after ``[memory] reprobe_after`` clean runs. A generate
job's estimate is the resident weights (all, the UNet alone with model offload, a layer with
sequential offload) plus the larger of the UNet's and the VAE decode's activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dropkiln.stages.base import MemoryRung

GIB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """What one family's LoRA training holds on the device, in GiB."""

    native: int
    """The resolution the activation figure is for (its side, in pixels)."""
    frozen_gib: float
    """UNet and text encoders in half precision, plus the CUDA context and workspaces."""
    image_gib: float
    """Activations kept for the backward pass, one image at the native resolution."""
    lora_params_per_rank: int
    """LoRA parameters per unit of rank over the attention set."""


FOOTPRINTS: dict[str, Footprint] = {
    # UNet 2.6 B parameters (4.8 GiB in fp16), two text encoders 0.8 B (1.5 GiB), context.
    "sdxl": Footprint(native=1024, frozen_gib=6.8, image_gib=12.0, lora_params_per_rank=1_450_000),
    # UNet 0.86 B parameters (1.6 GiB in fp16), text encoder 0.12 B (0.25 GiB), context.
    "sd15": Footprint(native=512, frozen_gib=2.4, image_gib=3.0, lora_params_per_rank=200_000),
}

CHECKPOINTED_SHARE = 0.25
"""Share of the activations still held with gradient checkpointing (block inputs only)."""

HEADROOM = 1.1
"""Need times this must fit: fragmentation of the caching allocator, peaks between ops."""

OPTIMIZER_STATE_BYTES: dict[str, int] = {
    # Bytes of state per trainable fp32 parameter, besides the parameter and its gradient.
    "adamw": 8,  # two fp32 moments
    "adamw8bit": 2,  # two 8-bit moments
    "adafactor": 4,  # factored second moment; counted as one fp32 state to stay safe
    "prodigy": 16,  # two moments, the initial weights and s
    "soap": 16,  # moments plus per-layer preconditioners (bounded for LoRA's thin matrices)
}


def training_need_gib(
    family: str, resolution: int, micro_batch: int, rank: int, optimizer: str, checkpointed: bool
) -> float:
    """Estimated device memory of one training step, in GiB."""
    fp = FOOTPRINTS[family]
    scale = (resolution / fp.native) ** 2
    activations = fp.image_gib * scale * micro_batch
    if checkpointed:
        activations *= CHECKPOINTED_SHARE
    params = fp.lora_params_per_rank * rank
    lora = params * (4 + 4 + OPTIMIZER_STATE_BYTES.get(optimizer, 16)) / GIB
    return fp.frozen_gib + activations + lora


def rung_micro_batch(batch: int, rung: MemoryRung) -> int:
    """Images per forward pass at ``rung`` (the training loop's own rule)."""
    if "micro_batch" in rung.options:
        return min(batch, int(rung.options["micro_batch"]))
    return max(1, math.ceil(batch / int(rung.options.get("micro_batch_divisor", 1))))


def training_start_rung(
    ladder: tuple[MemoryRung, ...],
    family: str | None,
    resolution: int,
    batch: int,
    rank: int,
    optimizer: str,
    available: int,
) -> int | None:
    """The first rung whose estimate fits ``available`` bytes (the bottom rung when none
    does); None when the family has no footprint (tiny test models, unknown kinds)."""
    if family not in FOOTPRINTS:
        return None
    for index, rung in enumerate(ladder):
        need = training_need_gib(
            family,
            resolution,
            rung_micro_batch(batch, rung),
            rank,
            optimizer,
            bool(rung.options.get("gradient_checkpointing")),
        )
        if need * HEADROOM * GIB <= available:
            return index
    return len(ladder) - 1


@dataclass(frozen=True)
class StartFacts:
    """What a stage's start-rung estimate may read besides its spec."""

    root: str
    """The daemon's root (models resolve under ROOT/state/models)."""
    rung_key: str | None
    """The planner's key, ``stage:model:resolution``: the resolution is its last part."""
    available: int
    """Device bytes free now plus those held by dropkiln's own warm pipelines."""

    def resolution(self, default: int) -> int:
        last = (self.rung_key or "").rsplit(":", 1)[-1]
        return int(last) if last.isdigit() else default

    def family(self, model: str) -> str | None:
        """The model's family for the footprint tables; None for the tiny test models, whose
        footprint is nothing like their family's, and for a model that does not resolve (the
        stage reports that itself)."""
        from pathlib import Path

        from dropkiln.stages.base import StageError
        from dropkiln.stages.models import TINY_NAMES, resolve_model

        if model in TINY_NAMES:
            return None
        try:
            return str(resolve_model(model, Path(self.root) / "state" / "models").kind)
        except StageError:
            return None


@dataclass(frozen=True)
class InferenceFootprint:
    """What one family's image generation holds on the device, in GiB (weights in half
    precision, the CUDA context included)."""

    native: int
    """The resolution the activation figures are for (its side, in pixels)."""
    weights_gib: float
    """UNet, text encoders and VAE, all on the device."""
    largest_gib: float
    """The largest component (the UNet): all model CPU offload keeps at once."""
    layer_gib: float
    """Sequential CPU offload: a layer's weights at a time, the context and buffers."""
    unet_image_gib: float
    """UNet activations of one image at the native resolution, both guidance halves."""
    decode_image_gib: float
    """Decoding one image's latents at the native resolution (the VAE runs in fp32)."""


INFERENCE_FOOTPRINTS: dict[str, InferenceFootprint] = {
    "sdxl": InferenceFootprint(
        native=1024, weights_gib=7.2, largest_gib=5.3, layer_gib=1.0,
        unet_image_gib=1.5, decode_image_gib=2.5,
    ),
    "sd15": InferenceFootprint(
        native=512, weights_gib=2.6, largest_gib=2.1, layer_gib=0.6,
        unet_image_gib=0.5, decode_image_gib=0.8,
    ),
}  # fmt: skip

SLICED_ATTENTION_SHARE = 0.6
"""Share of the UNet's activations left with attention slicing (the attention maps go)."""


def generation_need_gib(
    family: str, width: int, height: int, images: int, options: dict[str, object]
) -> float:
    """Estimated device memory of one pipeline call of ``images`` images at a generate rung.

    The UNet's activations are freed before the VAE decodes, so the peak is the resident
    weights plus the larger of the two. VAE slicing decodes one image at a time; tiling
    decodes in tiles of the native size, so a larger image costs no more than a native one.
    """
    fp = INFERENCE_FOOTPRINTS[family]
    scale = width * height / fp.native**2
    unet = fp.unet_image_gib * scale * images
    if options.get("attention_slicing"):
        unet *= SLICED_ATTENTION_SHARE
    decoded = 1 if options.get("vae_slicing") else images
    decode = fp.decode_image_gib * scale * decoded
    if options.get("vae_tiling"):
        decode = fp.decode_image_gib * min(scale, 1.0) * decoded
    resident = {"model": fp.largest_gib, "sequential": fp.layer_gib}.get(
        str(options.get("offload")), fp.weights_gib
    )
    return resident + max(unet, decode)


def generation_start_rung(
    ladder: tuple[MemoryRung, ...],
    family: str | None,
    width: int,
    height: int,
    images_per_call: Callable[[MemoryRung], int],
    available: int,
) -> int | None:
    """The first generate rung whose estimate fits ``available`` bytes (the bottom rung when
    none does); None when the family has no footprint."""
    if family not in INFERENCE_FOOTPRINTS:
        return None
    for index, rung in enumerate(ladder):
        need = generation_need_gib(family, width, height, images_per_call(rung), rung.options)
        if need * HEADROOM * GIB <= available:
            return index
    return len(ladder) - 1
