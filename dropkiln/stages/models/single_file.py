"""Original-layout (A1111/Civitai) single-file checkpoints: what family a file is, and the
component configs that ship with dropkiln for it.

The family is read from tensor names, the way ComfyUI and diffusers tell them apart:
SDXL base keeps its two text encoders under ``conditioner.embedders.0.transformer.``
(CLIP ViT-L) and ``conditioner.embedders.1.model.`` (OpenCLIP ViT-bigG); SD 1.5 keeps CLIP
ViT-L under ``cond_stage_model.transformer.``. SD 2.x (OpenCLIP ViT-H under
``cond_stage_model.model.``) and the SDXL refiner (bigG alone) are other models.

v-prediction and zero-terminal-SNR fine-tunes say so with empty marker tensors named
``v_pred`` and ``ztsnr`` (NoobAI-XL style; ComfyUI reads the same two keys), or with the
Stability model-spec header ``modelspec.prediction_type = "v"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dropkiln.stages.base import StageError

ModelKind = Literal["sdxl", "sd15"]
Prediction = Literal["epsilon", "v_prediction"]

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
"""configs/<kind>/: model_index.json and the component configs of SDXL base 1.0 / SD 1.5."""

_SDXL_BASE = ("conditioner.embedders.1.model.",)
_SDXL_CLIP_L = ("conditioner.embedders.0.transformer.",)
_SDXL_REFINER = ("conditioner.embedders.0.model.",)
_SD15 = ("cond_stage_model.transformer.",)
_SD2 = ("cond_stage_model.model.",)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format itself sets
_V_PREDICTION_MARKER = "v_pred"
_ZERO_SNR_MARKER = "ztsnr"
_MODELSPEC_PREDICTION = "modelspec.prediction_type"


@dataclass(frozen=True)
class CheckpointFamily:
    """What a single file is: SDXL base or SD 1.5, and how it was trained to predict."""

    kind: ModelKind
    prediction: Prediction = "epsilon"
    zero_terminal_snr: bool = False


def read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and ``__metadata__`` of a safetensors file, from its JSON header alone
    (no tensor is read and torch is not imported, so the planner can check a drop)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(handle.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise StageError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    metadata = header.pop("__metadata__", None) or {}
    return list(header), {str(k): str(v) for k, v in dict(metadata).items()}


def tensor_shape(path: Path, name: str) -> list[int]:
    """The shape a safetensors header gives tensor ``name``."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return [int(n) for n in json.loads(handle.read(size))[name]["shape"]]


def checkpoint_family(path: Path) -> CheckpointFamily:
    """Family and prediction type of an original-layout checkpoint, from its header."""
    keys, metadata = read_header(path)
    kind = _kind(path, keys)
    names = set(keys)
    declared = metadata.get(_MODELSPEC_PREDICTION, "").strip().lower()
    v_prediction = _V_PREDICTION_MARKER in names or declared in ("v", "v_prediction")
    return CheckpointFamily(
        kind=kind,
        prediction="v_prediction" if v_prediction else "epsilon",
        zero_terminal_snr=_ZERO_SNR_MARKER in names,
    )


def _kind(path: Path, keys: list[str]) -> ModelKind:
    def has(prefixes: tuple[str, ...]) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has(_SDXL_BASE) and has(_SDXL_CLIP_L):
        return "sdxl"
    if has(_SD15):
        return "sd15"
    if has(_SDXL_REFINER):
        raise StageError(f"{path.name} is an SDXL refiner; only SDXL base and SD 1.5 load")
    if has(_SD2):
        raise StageError(f"{path.name} is an SD 2.x checkpoint; only SDXL base and SD 1.5 load")
    if has(("model.diffusion_model.",)):
        raise StageError(
            f"{path.name} holds a UNet but no text encoder this loader knows "
            "(expected SDXL base or SD 1.5 in the original single-file layout)"
        )
    raise StageError(f"{path.name} does not look like an SD 1.5 or SDXL checkpoint")


def shipped_config(kind: ModelKind, root: Path | None = None) -> Path:
    """The diffusers config folder for ``kind`` (``root`` replaces the shipped one in tests)."""
    return (root or SHIPPED_CONFIGS) / kind
