"""The inference memory ladder: what each rung switches on, and switching it off again.

Rungs are cumulative: each keeps what the rung above did and adds one more saving. A warm
pipeline is shared between jobs, so whatever a rung changes is undone when the job ends.
The first step down also halves the images per pipeline call; the offload rungs render
one image a call, since their cost is moving weights, not activations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dropkiln.stages.base import MemoryRung
from dropkiln.stages.generation.prompt_file import MAX_BATCH

if TYPE_CHECKING:
    import torch
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

_SLICING = {"attention_slicing": True, "vae_slicing": True, "batch_divisor": 2}
_TILING = {**_SLICING, "vae_tiling": True}
_ONE_A_CALL = {**_TILING, "batch_divisor": MAX_BATCH}

GENERATE_LADDER: tuple[MemoryRung, ...] = (
    MemoryRung("default", {"batch_divisor": 1}),
    MemoryRung("attention-vae-slicing", _SLICING),
    MemoryRung("vae-tiling", _TILING),
    MemoryRung("model-cpu-offload", {**_ONE_A_CALL, "offload": "model"}),
    MemoryRung("sequential-cpu-offload", {**_ONE_A_CALL, "offload": "sequential"}),
)

GPU_BATCH = 4
"""Images per call when the prompt file does not say, on a GPU at the top rung. On the CPU
the default is 1: float32 on the CPU is compute-bound, so a batch buys little there and an
OOM retry or a stop would throw away more finished work."""


def batch_limit(asked: int | None, rung: MemoryRung, device: str) -> int:
    """Images per pipeline call at ``rung``: what was asked (or the device's default),
    divided by the rung's divisor, at least one."""
    wanted = asked if asked is not None else (1 if device == "cpu" else GPU_BATCH)
    return max(1, wanted // int(rung.options.get("batch_divisor", 1)))


def apply_rung(pipe: DiffusionPipeline, options: dict[str, object], device: str) -> None:
    """Switch on the rung's options through diffusers' own switches."""
    import torch

    if options.get("attention_slicing"):
        pipe.enable_attention_slicing()
    if options.get("vae_slicing"):
        pipe.vae.enable_slicing()
    if options.get("vae_tiling"):
        pipe.vae.enable_tiling()
    offload = options.get("offload")
    if offload == "model" and torch.device(device).type == "cpu":
        # Weights already live on the CPU, so model offload saves nothing there; and diffusers
        # would hook every component on "cpu:0", which accelerate takes for another device
        # than "cpu" and so copies each component's weights at each call. The copies lie at
        # other memory alignments than the loaded weights, where the CPU matmul kernels round
        # some results differently: the warm pipeline then no longer rendered exactly as a
        # fresh load (issue 12). The rung's slicing, tiling and one image a call still apply.
        offload = None
    if offload is None and _away_from(pipe, torch.device(device)):
        pipe.to(device)  # back from the CPU, where an offloading job left it
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        _sequential_offload(pipe, device)


def moves_weights(pipe: DiffusionPipeline, options: dict[str, object]) -> bool:
    """A pipeline call at this rung moves or recasts weights: the offload rungs' hooks move
    them in and out, and diffusers' SDXL pipelines cast a float16 VAE whose config says it
    overflows (``force_upcast``) to float32 for the decode, then back."""
    import torch

    vae = pipe.vae
    return bool(options.get("offload")) or (vae.dtype == torch.float16 and vae.config.force_upcast)


def _away_from(pipe: DiffusionPipeline, device: torch.device) -> bool:
    """A component's weights are not on ``device`` (``pipe.device`` says the same, but first
    looks for group-offloading hooks through every submodule: 2-3 ms a job on the CPU)."""
    import itertools

    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            first = next(itertools.chain(component.parameters(), component.buffers()), None)
            if first is not None and not on_device(first.device, device):
                return True
    return False


def on_device(actual: torch.device, wanted: torch.device) -> bool:
    """A tensor on ``actual`` is where ``wanted`` points: torch reports weights on "cuda:N",
    while "cuda" alone means the current card."""
    import torch

    if actual.type != wanted.type:
        return False
    if wanted.type != "cuda" or wanted.index is not None:
        return actual == wanted
    return actual.index == torch.cuda.current_device()


def undo_rung(pipe: DiffusionPipeline, options: dict[str, object], device: str) -> None:
    """Leave the pipeline without hooks or slicing; after offloading its weights stay on the
    CPU (moving them all back now could run out of memory again); the next job moves them."""
    if options.get("offload"):
        pipe.remove_all_hooks()
        pipe.to("cpu", silence_dtype_warnings=True)
    if options.get("attention_slicing"):
        pipe.disable_attention_slicing()
    if options.get("vae_slicing"):
        pipe.vae.disable_slicing()
    if options.get("vae_tiling"):
        pipe.vae.disable_tiling()


def _sequential_offload(pipe: DiffusionPipeline, device: str) -> None:
    import torch

    target = torch.device(device)
    if target.type != "cpu":
        pipe.enable_sequential_cpu_offload(device=device)
        return
    # diffusers pins the execution device to "cpu:0", which accelerate then treats as
    # another device than "cpu" and trips over; hooking the components ourselves with
    # plain "cpu" is the same offload (weights on meta, loaded per submodule call).
    from accelerate import cpu_offload

    pipe.remove_all_hooks()
    vars(pipe)["_offload_device"] = target  # where diffusers reads its execution device
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        if name in pipe._exclude_from_cpu_offload:
            component.to(target)
        else:
            cpu_offload(component, target, offload_buffers=len(component._parameters) > 0)
