"""``tiny-shapes``: the built-in model that draws coloured shapes, at SDXL's architecture.

The same pipeline classes as ``tiny-sdxl`` (two CLIP text encoders, a text-time UNet, a KL
VAE), small enough to train on a CPU: a VAE that downsamples 4× (64 px → 16×16 latents),
a three-level UNet and two narrow text encoders. Its weights were
trained by ``python -m dropkiln.stages.models.train_tiny`` and ship with the package; the
file's sha256 is pinned here and checked before the weights are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.models.shapes_scenes import WORDS
from dropkiln.stages.models.tokenizer import CAPTION_WORDS, special_token_ids

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

SHAPES_WORDS = (*CAPTION_WORDS, *WORDS)
"""The tokenizer's whole words: the common caption words and the scene words."""

SHAPES_SEED = 20261130
SHAPES_WEIGHTS = Path(__file__).with_name("weights") / "tiny-shapes.safetensors"
SHAPES_WEIGHTS_SHA256 = "08c75b9c8f8bc549a68bc05e9c36967300ca0b901d804f589ead5c230744ab36"
"""sha256 of the shipped weights file, as ``train_tiny`` wrote it."""

TEXT_WIDTH = 32
TEXT_WIDTH_2 = 48
TIME_EMBED_DIM = 8
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")


def shapes_architecture() -> dict[str, Any]:
    """tiny-shapes' components with seeded (untrained) weights and its scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dropkiln.stages.models.tiny import SCHEDULER_CONFIG, seed_weights, tiny_text_config

    bos, eos = special_token_ids(SHAPES_WORDS)

    def text_config(width: int) -> CLIPTextConfig:
        return tiny_text_config(width, bos, eos)

    components: dict[str, Any] = {
        "text_encoder": CLIPTextModel(text_config(TEXT_WIDTH)),
        "text_encoder_2": CLIPTextModelWithProjection(text_config(TEXT_WIDTH_2)),
        "unet": UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4, 4),
            norm_num_groups=16,
            cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH_2,
            use_linear_projection=True,
        ),
        "vae": AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 32),
            layers_per_block=1,
            latent_channels=4,
            # one group: a group norm removes each group's mean and spread per picture, and
            # on flat pictures those are the colours themselves; with one group only their
            # overall level goes (at four groups the decoder gave back one colour for all)
            norm_num_groups=1,
            sample_size=64,
            force_upcast=False,
        ),
        "scheduler": EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }
    for index, key in enumerate(COMPONENTS):
        seed_weights(components[key], SHAPES_SEED + index)
    return components


def shapes_components(weights: Path | None = None) -> dict[str, Any]:
    """tiny-shapes with its shipped, trained weights (checked against the pinned sha256), or
    with ``weights``, a file the training script wrote."""
    from safetensors.torch import load_file

    if weights is None:
        check_shipped_weights()
    components = shapes_architecture()
    state = load_file(str(weights or SHAPES_WEIGHTS))
    apply_weights(components, state)
    return components


def apply_weights(components: dict[str, Any], state: dict[str, Any]) -> None:
    """Load a ``component.tensor`` keyed state dict; the VAE's scaling factor rides along."""
    for key in COMPONENTS:
        prefix = f"{key}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        components[key].load_state_dict(own, strict=True)
    if "vae_scaling_factor" in state:
        factor = float(state["vae_scaling_factor"].item())
        components["vae"].register_to_config(scaling_factor=factor)


def check_shipped_weights() -> None:
    from dropkiln.stages.base import StageError
    from dropkiln.stages.models.refs import file_sha256

    if not SHAPES_WEIGHTS.is_file():
        raise StageError(f"tiny-shapes weights are missing from the package ({SHAPES_WEIGHTS})")
    actual = file_sha256(SHAPES_WEIGHTS)
    if actual != SHAPES_WEIGHTS_SHA256:
        raise StageError(
            f"tiny-shapes weights at {SHAPES_WEIGHTS} have sha256 {actual[:16]}…, "
            f"expected {SHAPES_WEIGHTS_SHA256[:16]}… (a damaged install?)"
        )
