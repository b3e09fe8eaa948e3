"""ControlNet for control images: the tiny built-in one, local folders, and the pipelines."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.base import StageError

if TYPE_CHECKING:
    import torch

    from dropkiln.stages.generation.prompt_file import ControlRef
    from dropkiln.stages.models import ModelRef

TINY_CONTROLNET_SEED = 20240602
TINY_CONTROL = "tiny"
# The parts a ControlNet adds to a UNet copy; from_unet leaves them zeroed or torch-random,
# and the tiny one overwrites them from a fixed numpy stream so they differ from zero
# (a zero ControlNet would ignore its control image) and are the same on every machine.
_OWN_PARTS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
_KEEP_LOADED = 2

_lock = threading.Lock()
_loaded: OrderedDict[tuple[str, str, str], Any] = OrderedDict()


def controlnet_folder(model: str, base: ModelRef, models_dir: Path) -> Path:
    """The folder of the ControlNet an entry names: ``tiny`` (built once) or a local folder."""
    if model == TINY_CONTROL:
        if base.single_file or not (base.path / "dropkiln-tiny.json").is_file():
            raise StageError(
                f"control model 'tiny' goes with the tiny models, not {base.name}; "
                "name a local ControlNet folder"
            )
        return ensure_tiny_controlnet(base, models_dir)
    folder = Path(model).expanduser()
    if not folder.is_absolute():
        folder = models_dir / folder
    if not (folder / "config.json").is_file():
        raise StageError(f"control model {model!r}: no ControlNet folder at {folder}")
    if not any(folder.glob("*.safetensors")):
        raise StageError(f"control model {model!r}: {folder} has no .safetensors weights")
    return folder


def ensure_tiny_controlnet(base: ModelRef, models_dir: Path) -> Path:
    """A ControlNet made from the tiny model's UNet with a fixed seed, saved once."""
    target = Path(models_dir) / f"controlnet-{base.kind}-tiny-{base.fingerprint[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        controlnet = _build_tiny_controlnet(base.path)
        controlnet.save_pretrained(staging, safe_serialization=True)
        (staging / "dropkiln-tiny.json").write_text(
            json.dumps({"base": base.name, "base_fingerprint": base.fingerprint})
        )
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not just another builder winning
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _build_tiny_controlnet(base_folder: Path) -> Any:
    import numpy as np
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    # A clean UNet from disk: the warm one may carry LoRA layers.
    unet = UNet2DConditionModel.from_pretrained(
        base_folder, subfolder="unet", use_safetensors=True, local_files_only=True
    )
    # the control image is brought down to the latent size: one halving per VAE down block
    vae = json.loads((base_folder / "vae" / "config.json").read_text())
    halvings = len(vae["block_out_channels"]) - 1
    channels = (8, *(8 if n < halvings - 2 else 16 for n in range(halvings)))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    generator = np.random.Generator(np.random.PCG64(TINY_CONTROLNET_SEED))
    parameters = dict(controlnet.named_parameters())
    with torch.no_grad():
        for name in sorted(parameters):
            if not name.startswith(_OWN_PARTS):
                continue
            param = parameters[name]
            bound = 1.0 / math.sqrt(_fan_in(parameters, name))
            uniform = generator.random(param.numel(), dtype=np.float64)
            values = ((uniform * 2.0 - 1.0) * bound).astype(np.float32).reshape(param.shape)
            param.copy_(torch.from_numpy(values))
    return controlnet


def _fan_in(parameters: dict[str, Any], name: str) -> int:
    weight = parameters.get(name.rsplit(".", 1)[0] + ".weight", parameters[name])
    if weight.dim() >= 2:
        return int(weight.shape[1] * math.prod(weight.shape[2:]))
    return max(int(weight.shape[-1]), 1)


def load_controlnet(folder: Path, device: str, dtype: torch.dtype) -> Any:
    """A loaded ControlNet (safetensors only); the last few stay warm."""
    from diffusers import ControlNetModel

    key = (str(folder.resolve()), device, str(dtype))
    with _lock:
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
    try:
        controlnet = ControlNetModel.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, torch_dtype=dtype
        ).to(device)
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load ControlNet {folder}: {exc}") from exc
    with _lock:
        _loaded[key] = controlnet
        while len(_loaded) > _KEEP_LOADED:
            _loaded.popitem(last=False)
    return controlnet


def control_pipeline(pipe: Any, controlnets: list[Any]) -> Any:
    """The ControlNet pipeline sharing ``pipe``'s components (no copies); several
    ControlNets become diffusers' MultiControlNetModel."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    is_xl = "XL" in type(pipe).__name__
    cls = StableDiffusionXLControlNetPipeline if is_xl else StableDiffusionControlNetPipeline
    controlnet = controlnets[0] if len(controlnets) == 1 else controlnets
    control = cls.from_pipe(pipe, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    return control


CONTROL_MAX_BYTES = 256 * 2**20


def read_control_bytes(path: str | Path) -> bytes:
    """A control (or init or mask) image's bytes, read without following a link (the prompt
    folder sits in ``processed/``, where whoever dropped it may still write)."""
    from dropkiln.stages.dataset import read_dataset_file

    path = Path(path)
    return read_dataset_file(path.parent, path.name, CONTROL_MAX_BYTES)


def image_digest(path: str | Path) -> str:
    """sha256 of an input image's bytes, read as ``read_control_bytes`` reads them."""
    return hashlib.sha256(read_control_bytes(path)).hexdigest()


def control_inputs(controls: list[ControlRef], where: str) -> dict[str, Any]:
    """The pipeline arguments for an entry's ControlNets: one value each, or a list."""
    images = [control_image(control, where) for control in controls]
    columns = {
        "image": images,
        "controlnet_conditioning_scale": [control.scale for control in controls],
        "control_guidance_start": [control.start for control in controls],
        "control_guidance_end": [control.end for control in controls],
    }
    if len(controls) == 1:
        return {argument: values[0] for argument, values in columns.items()}
    return columns


def control_record(control: ControlRef) -> dict[str, Any]:
    """What the ``dropkiln`` chunk keeps of a control: the image's name and digest, and the
    settings that differ from the defaults (so older records keep their digests)."""
    record = control.model_dump(mode="json", exclude_defaults=True)
    record.update(
        model=control.model,
        scale=control.scale,
        image=Path(control.image).name,
        sha256=image_digest(control.image),
    )
    return record


def control_image(control: ControlRef, where: str) -> Any:
    """The control image as RGB (its Canny edges with ``preprocess = "canny"``), or a
    StageError naming the entry."""
    import io

    from PIL import Image, UnidentifiedImageError

    from dropkiln.stages.dataset import UnsafeFile

    try:
        with Image.open(io.BytesIO(read_control_bytes(control.image))) as img:
            image = img.convert("RGB")
    except (OSError, UnidentifiedImageError, UnsafeFile) as exc:
        name = Path(control.image).name
        raise StageError(f"{where}: control image {name} cannot be read: {exc}") from exc
    if control.preprocess == "canny":
        image = canny_edges(image)
    return image


CANNY_THRESHOLDS = (100, 200)
"""A1111's ControlNet extension's defaults for its canny preprocessor."""


def canny_edges(image: Any) -> Any:
    """White Canny edges on black, as RGB: what a canny ControlNet was trained on."""
    import cv2
    import numpy as np
    from PIL import Image

    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, *CANNY_THRESHOLDS)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
