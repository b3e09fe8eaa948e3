"""img2img and inpainting: the pipelines that share the warm model's parts, and the images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dropkiln.stages.base import StageError
from dropkiln.stages.generation.prompt_file import ImageTask

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image


def image_mode(task: ImageTask) -> str | None:
    """``inpaint``, ``img2img`` or None (text to image) for ``task``."""
    if task.init_image is None:
        return None
    return "inpaint" if task.mask is not None else "img2img"


def init_pipeline(pipe: DiffusionPipeline, mode: str) -> DiffusionPipeline:
    """diffusers' img2img or inpainting pipeline for ``pipe``'s family, sharing its parts."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    cls = AutoPipelineForInpainting if mode == "inpaint" else AutoPipelineForImage2Image
    pipeline = cls.from_pipe(pipe)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def init_inputs(task: ImageTask) -> dict[str, Image.Image]:
    """The ``image`` (RGB) and ``mask_image`` (L) arguments, or a StageError naming the entry."""
    import io

    from PIL import Image, UnidentifiedImageError

    from dropkiln.stages.dataset import UnsafeFile
    from dropkiln.stages.generation.controlnet import read_control_bytes

    inputs: dict[str, Image.Image] = {}
    for argument, path, mode in (("image", task.init_image, "RGB"), ("mask_image", task.mask, "L")):
        if path is None:
            continue
        try:
            with Image.open(io.BytesIO(read_control_bytes(path))) as img:
                inputs[argument] = img.convert(mode)
        except (OSError, UnidentifiedImageError, UnsafeFile) as exc:
            field = "init_image" if argument == "image" else "mask"
            raise StageError(
                f"image[{task.entry}].{field}: {Path(path).name} cannot be read: {exc}"
            ) from exc
    return inputs
