"""One diffusers call per image or latent-walk frame, with the parameters of an ImageTask."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from dropkiln.stages.base import StageError
from dropkiln.stages.generation.prompt_file import ImageTask
from dropkiln.stages.generation.schedulers import needs_zero_snr

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Lin et al. 2023 (section 3.4) use 0.7 with their zero-terminal-SNR models.
ZERO_SNR_GUIDANCE_RESCALE = 0.7

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


class PipelineCalls:
    """The context of a job's pipeline calls: ``torch.inference_mode``, as ComfyUI runs every
    prompt (no autograd bookkeeping per op: 3-8% of tiny-sdxl's time on the CPU), unless
    ``inference`` is off; and the calls' wall seconds and the calling thread's CPU seconds
    (less than the wall time by what it waited for: the GIL, a core, the disk).

    The warm pipeline is shared with training, and a weight made inside inference mode is an
    inference tensor, which torch will not save for a backward pass: a call that moves or
    recasts weights (``memory_ladder.moves_weights``) runs with ``inference`` off."""

    def __init__(self) -> None:
        self.inference = True
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self._started = (0.0, 0.0)
        self._mode: Any = None

    def __enter__(self) -> None:
        import torch

        self._mode = torch.inference_mode(self.inference)
        self._mode.__enter__()
        self._started = (time.perf_counter(), time.thread_time())

    def __exit__(self, *exc: object) -> None:
        wall, cpu = self._started
        self.seconds += time.perf_counter() - wall
        self.cpu_seconds += time.thread_time() - cpu
        self._mode.__exit__(*exc)


def inference_dtype(device: str) -> torch.dtype:
    """The device's one weights dtype, the one training uses (compute_dtype): float32 on the
    CPU, bfloat16 on a GPU that has it, else float16. One warm copy serves both stages.

    In float16, diffusers decodes with the VAE upcast to float32 when the VAE's config
    says it overflows (SDXL's ``force_upcast``), or a fp16-fix VAE is given (``vae``)."""
    from dropkiln.stages.models.encoding import compute_dtype

    return compute_dtype(device)


def diffusers_clip_skip(pipe: Any, clip_skip: int | None) -> int | None:
    """A1111's "Clip skip" (1 = last layer, 2 = the one before) as diffusers counts it."""
    if clip_skip is None or clip_skip <= 1:
        return None
    layers = int(pipe.text_encoder.config.num_hidden_layers)
    if clip_skip > layers:
        raise StageError(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers")
    _text_model_alias(pipe.text_encoder)
    return clip_skip - 1


def _text_model_alias(text_encoder: Any) -> None:
    # SD 1.5's clip-skip path reads text_encoder.text_model.final_layer_norm, a wrapper
    # transformers 5 no longer has; point it at the layer norm without registering a module.
    if "text_model" not in vars(text_encoder) and not hasattr(text_encoder, "text_model"):
        alias = SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
        vars(text_encoder)["text_model"] = alias


def call_options(pipe: Any, task: ImageTask, on_step_end: StepCallback | None) -> dict[str, Any]:
    """The keyword arguments every call for ``task`` shares (the scheduler is set aside)."""
    options: dict[str, Any] = {
        "num_inference_steps": task.steps,
        "guidance_scale": task.guidance,
        "width": task.width,
        "height": task.height,
        "output_type": "pil",
    }
    if needs_zero_snr(pipe.scheduler.config):
        # the companion fix to zero terminal SNR: keeps high guidance from overexposing
        options["guidance_rescale"] = ZERO_SNR_GUIDANCE_RESCALE
    clip_skip = diffusers_clip_skip(pipe, task.clip_skip)
    if clip_skip is not None:
        options["clip_skip"] = clip_skip
    if on_step_end is not None:
        options["callback_on_step_end"] = on_step_end
        options["callback_on_step_end_tensor_inputs"] = ["latents"]
    return options


def seeded(seed: int) -> torch.Generator:
    """A CPU generator: the same noise on every device, so CPU and GPU runs agree."""
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def render_batch(
    pipe: Any,
    tasks: list[ImageTask],
    on_step_end: StepCallback | None,
    inputs: dict[str, Any] | None = None,
) -> list[Image.Image]:
    """The images for ``tasks`` (one ``batch_key``) in one call, each from its own seed.

    ``inputs`` are the images the call takes (a control image, or an init image and mask):
    one for the batch, which the pipeline repeats."""
    lead = tasks[0]
    options = call_options(pipe, lead, on_step_end)
    options.update(inputs or {})
    if lead.init_image is not None:
        options["strength"] = lead.strength
        if lead.mask is None:
            # img2img takes its size from the image (checked to be the entry's size)
            del options["width"], options["height"]
    # an empty negative is None, not "": SDXL then uses zero embeddings, as A1111 does
    negatives = [task.negative for task in tasks] if lead.negative else None
    result = pipe(
        prompt=[task.prompt for task in tasks],
        negative_prompt=negatives,
        generator=[seeded(task.seed) for task in tasks],
        **options,
    )
    images: list[Image.Image] = result.images
    return images


def batch_key(task: ImageTask) -> str:
    """Tasks with equal keys can share a pipeline call: everything but what is per image."""
    shared = task.model_dump(
        mode="json", exclude={"index", "entry", "stem", "prompt", "negative", "seed"}
    )
    shared["has_negative"] = bool(task.negative)
    return json.dumps(shared, sort_keys=True)


def prompt_embeddings(pipe: Any, task: ImageTask) -> dict[str, Any]:
    """The prompt and negative embeddings the pipeline would compute for ``task``."""
    guided = task.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    encoded = pipe.encode_prompt(
        prompt=task.prompt,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=guided,
        negative_prompt=task.negative or None,
        clip_skip=diffusers_clip_skip(pipe, task.clip_skip),
    )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if len(encoded) == 4:
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, encoded, strict=True))


def initial_noise(pipe: Any, task: ImageTask, dtype: torch.dtype) -> torch.Tensor:
    """The starting latents the pipeline draws for ``task``'s seed (before sigma scaling)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (
        1,
        pipe.unet.config.in_channels,
        task.height // pipe.vae_scale_factor,
        task.width // pipe.vae_scale_factor,
    )
    noise: torch.Tensor = randn_tensor(
        shape, generator=seeded(task.seed), device=pipe._execution_device, dtype=dtype
    )
    return noise


def render_from_embeddings(
    pipe: Any,
    task: ImageTask,
    embeddings: dict[str, Any],
    latents: torch.Tensor,
    on_step_end: StepCallback | None,
) -> Image.Image:
    """An image from given embeddings and starting latents (a latent-walk frame)."""
    options = call_options(pipe, task, on_step_end)
    options.pop("clip_skip", None)  # already applied when the embeddings were made
    present = {name: value for name, value in embeddings.items() if value is not None}
    result = pipe(latents=latents, generator=seeded(task.seed), **present, **options)
    image: Image.Image = result.images[0]
    return image
