"""Loading a resolved model as a diffusers pipeline: local safetensors only, never fetched."""

from __future__ import annotations

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
        if ref.single_file:
            pipe = cls.from_single_file(str(ref.path), config=str(ref.config_dir), **options)
        else:
            pipe = cls.from_pretrained(str(ref.path), use_safetensors=True, **options)
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load model {ref.name}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_bytes(pipe: Any) -> int:
    """Bytes held by a pipeline's parameters and buffers (what the warm cache budgets)."""
    import torch

    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                total += tensor.numel() * tensor.element_size()
    return total
