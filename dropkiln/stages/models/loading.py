"""Loading a resolved model as a diffusers pipeline: local safetensors only, never fetched."""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any

from dropkiln.stages.base import StageError
from dropkiln.stages.models.offline import enforce_offline, quiet_libraries
from dropkiln.stages.models.refs import ModelRef

if TYPE_CHECKING:
    import torch


def pipeline_class(kind: str) -> Any:
    """StableDiffusionXLPipeline for sdxl, StableDiffusionPipeline for sd15."""
    enforce_offline()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline


def load_pipeline(ref: ModelRef, device: str, dtype: torch.dtype) -> Any:
    """A fresh pipeline for ``ref`` on ``device`` in ``dtype`` (safety checker off)."""
    enforce_offline()
    quiet_libraries()
    cls = pipeline_class(ref.kind)
    options: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if ref.kind == "sd15":
        options.update(safety_checker=None, requires_safety_checker=False)
    try:
        if ref.vae is not None:
            from dropkiln.stages.models.vae import load_vae

            options["vae"] = load_vae(ref.vae, ref.config_dir or ref.path, dtype)
        if ref.single_file:
            options.update(single_file_parts(ref))
            pipe = cls.from_single_file(str(ref.path), config=str(ref.config_dir), **options)
        else:
            pipe = cls.from_pretrained(str(ref.path), use_safetensors=True, **options)
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load model {ref.name}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def single_file_parts(ref: ModelRef) -> dict[str, Any]:
    """What a single file does not hold: CLIP tokenizers and the noise scheduler.

    The tokenizers are built from CLIP's BPE vocabulary (SDXL's second one, OpenCLIP bigG,
    pads with ``!``); the scheduler is the shipped one, set to the file's prediction type.
    """
    import diffusers

    from dropkiln.stages.generation.schedulers import ZERO_SNR_OPTIONS
    from dropkiln.stages.models.clip_tokenizer import clip_tokenizer

    assert ref.config_dir is not None
    parts: dict[str, Any] = {"tokenizer": clip_tokenizer("endoftext")}
    if ref.kind == "sdxl":
        parts["tokenizer_2"] = clip_tokenizer("zero")
    config = json.loads((ref.config_dir / "scheduler" / "scheduler_config.json").read_text())
    variant: dict[str, Any] = {"prediction_type": ref.prediction}
    if ref.zero_terminal_snr:
        variant.update(ZERO_SNR_OPTIONS)
    cls = getattr(diffusers, config["_class_name"])
    accepted = inspect.signature(cls.__init__).parameters
    parts["scheduler"] = cls.from_config(
        config, **{k: v for k, v in variant.items() if k in accepted}
    )
    return parts


def pipeline_bytes(pipe: Any) -> int:
    """Bytes held by a pipeline's parameters and buffers (what the warm cache budgets)."""
    import torch

    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                total += tensor.numel() * tensor.element_size()
    return total
