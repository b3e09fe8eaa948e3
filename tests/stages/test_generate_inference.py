"""Pipeline calls run under ``torch.inference_mode``, as ComfyUI runs every prompt: torch then
keeps no version counters or view records for autograd, a few percent of a small model's
CPU time. The warm pipeline is shared with training, so no call may leave a weight behind
as an inference tensor (torch will not save one for a backward pass): calls that move or
recast weights (the offload rungs, diffusers' float16 VAE upcast) run without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_generate import entries, gen_root, local, one_thread, spec_for

from dropkiln.stages.generate import run_generate

torch = pytest.importorskip("torch")

__all__ = ["gen_root", "one_thread"]


def _record_modes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether inference mode was on, at each entry into the SDXL pipeline's call."""
    from diffusers import StableDiffusionXLPipeline

    modes: list[bool] = []
    real_call = StableDiffusionXLPipeline.__call__

    def call(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        modes.append(torch.is_inference_mode_enabled())
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    return modes


def _warm_pipeline(root: Path, device: str) -> Any:
    """The pipeline the stage ran on (the warm cache's: one per model and device)."""
    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.models import resolve_model, shared_pipelines

    model = resolve_model("tiny-sdxl", root / "state" / "models")
    return shared_pipelines().get(model, device, inference_dtype(device))


def _inference_tensors(pipe: Any) -> list[str]:
    names = []
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = [*module.named_parameters(), *module.named_buffers()]
            names += [f"{component}.{name}" for name, value in tensors if value.is_inference()]
    return names


@pytest.mark.parametrize(
    ("rung", "inference", "device"),
    [
        (0, True, "cpu"),
        (4, False, "cpu"),
        # model offload moves whole components in the call; on the CPU it is not applied
        pytest.param(3, False, "cuda", marks=pytest.mark.gpu),
    ],
)
def test_calls_run_in_inference_mode_unless_the_rung_moves_weights(
    gen_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rung: int, inference: bool,
    device: str,
) -> None:  # fmt: skip
    """The offload rungs' hooks move weights to the device and back inside the call."""
    modes = _record_modes(monkeypatch)
    prompt_file = entries("a red fox", "a blue ship", seed=3)
    ctx = local(gen_root, tmp_path, memory_rung=rung, device=device)
    run_generate(spec_for(tmp_path / "out", prompt_file), ctx)
    assert modes == [inference, inference]
    pipe = _warm_pipeline(gen_root, device)
    assert _inference_tensors(pipe) == []
    # the training stage's use of the same warm weights: a backward through the UNet
    pipe.unet.to(device)
    config = pipe.unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    sample = torch.randn(1, 4, 8, 8, device=device, requires_grad=True)
    text = torch.randn(1, 77, config.cross_attention_dim, device=device)
    extra = {
        "text_embeds": torch.randn(1, pooled, device=device),
        "time_ids": torch.zeros(1, 6, device=device),
    }
    out = pipe.unet(sample, 10, text, added_cond_kwargs=extra).sample
    out.sum().backward()
    assert sample.grad is not None


def test_a_float16_vae_that_diffusers_upcasts_keeps_inference_mode_off(
    gen_root: Path, tmp_path: Path
) -> None:
    """SDXL's pipelines cast a float16 VAE whose config says it overflows to float32 for the
    decode, and back after: in inference mode that leaves its weights inference tensors."""
    from dropkiln.stages.generation.memory_ladder import moves_weights
    from dropkiln.stages.models import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model("tiny-sdxl", gen_root / "state" / "models"), "cpu",
                         torch.float32)  # fmt: skip
    assert not moves_weights(pipe, {})
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    assert moves_weights(pipe, {})
    pipe.vae.register_to_config(force_upcast=False)  # a fp16-fix VAE decodes in float16
    assert not moves_weights(pipe, {})
    assert moves_weights(pipe, {"offload": "model"})
