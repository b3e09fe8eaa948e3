"""Encoding images and captions the way the SD/SDXL pipelines do, for caching and training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image


def compute_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """The weight dtype for a device: fp32 on the CPU, bf16 (else fp16) on CUDA."""
    import torch

    if requested != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            requested
        ]
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def pixels_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size → a (B, 3, H, W) float tensor in [-1, 1]."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).div(127.5).sub(1.0)


@contextmanager
def vae_for_encoding(pipe: Any, tiled: bool) -> Iterator[Any]:
    """The pipeline's VAE, upcast when its config asks (SDXL's VAE overflows in fp16)."""
    import torch

    vae = pipe.vae
    original = vae.dtype
    upcast = original == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    if tiled:
        vae.enable_tiling()
    try:
        yield vae
    finally:
        if tiled:
            vae.disable_tiling()
        if upcast:
            vae.to(original)


def encode_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The scaled latent mean of each image (what the UNet is trained to denoise)."""
    import torch

    with torch.no_grad():
        pixels = pixels.to(vae.device, vae.dtype)
        distribution = vae.encode(pixels).latent_dist
        latents: torch.Tensor = distribution.mode()
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        scaled: torch.Tensor = (latents - shift) * vae.config.scaling_factor
        return scaled


def encode_captions(pipe: Any, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Text-encoder outputs as the pipeline computes them.

    SD 1.5: the last hidden state. SDXL: both encoders' penultimate hidden states side by
    side, and the second encoder's pooled projection. Gradients flow when the encoders
    carry trainable LoRA weights; callers wrap this in ``torch.no_grad()`` otherwise.
    """
    import torch

    encoders = [pipe.text_encoder]
    tokenizers = [pipe.tokenizer]
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl:
        encoders.append(pipe.text_encoder_2)
        tokenizers.append(pipe.tokenizer_2)
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        output = encoder(ids, output_hidden_states=sdxl)
        if sdxl:
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        else:
            hidden.append(output[0])
    result = {"prompt_embeds": torch.cat(hidden, dim=-1)}
    if pooled is not None:
        result["pooled_prompt_embeds"] = pooled
    return result
