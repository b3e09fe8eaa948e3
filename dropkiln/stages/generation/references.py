"""Reference images through IP-Adapter: the tiny built-in adapter, local adapter files, and
attaching them to a pipeline for as long as a run of entries needs them.

An IP-Adapter file is the original (h94/IP-Adapter) layout: ``image_proj.*`` and
``ip_adapter.*`` keys in one .safetensors file, with the CLIP image encoder in an
``image_encoder/`` folder beside it, as in h94's ``models/`` and ``sdxl_models/``.
Each reference image gets its own copy of the adapter, so each has its own weight
(diffusers' multi-adapter form: one image and one scale per adapter).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dropkiln.stages.base import StageError

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    from dropkiln.stages.generation.prompt_file import ReferenceRef
    from dropkiln.stages.models import ModelRef

TINY_ADAPTER = "tiny"
TINY_ADAPTER_SEED = 20240603
ADAPTER_FILE = "ip-adapter.safetensors"
IMAGE_ENCODER = "image_encoder"
# base IP-Adapter: the image embedding becomes four extra cross-attention tokens
_IMAGE_TOKENS = 4
_TINY_EMBEDDING = 32


class AdapterPipeline(Protocol):
    """What a pipeline with diffusers' IP-Adapter loader offers (every SD and SDXL one)."""

    def register_modules(self, **modules: object) -> None: ...

    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str,
        subfolder: str,
        weight_name: list[str],
        **kwargs: bool,
    ) -> None: ...

    def unload_ip_adapter(self) -> None: ...

    def set_ip_adapter_scale(self, scale: list[float]) -> None: ...


def adapter_file(name: str, base: ModelRef, models_dir: Path) -> Path:
    """The IP-Adapter file a reference names: ``tiny`` (built once) or a local file."""
    if name == TINY_ADAPTER:
        if base.single_file or not (base.path / "dropkiln-tiny.json").is_file():
            raise StageError(
                f"reference adapter 'tiny' goes with the tiny models, not {base.name}; "
                "name a local IP-Adapter .safetensors file"
            )
        return ensure_tiny_adapter(base, models_dir) / ADAPTER_FILE
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = models_dir / path
    if path.suffix != ".safetensors" or not path.is_file():
        raise StageError(f"reference adapter {name!r}: no IP-Adapter .safetensors file at {path}")
    encoder = path.parent / IMAGE_ENCODER
    if not (encoder / "config.json").is_file() or not any(encoder.glob("*.safetensors")):
        raise StageError(
            f"reference adapter {name!r}: no image encoder (config.json and .safetensors) "
            f"in {encoder}"
        )
    return path


def ensure_tiny_adapter(base: ModelRef, models_dir: Path) -> Path:
    """An image encoder and IP-Adapter for a tiny model from a fixed seed, saved once."""
    target = Path(models_dir) / f"ip-adapter-{base.kind}-tiny-{base.fingerprint[:12]}"
    if (target / ADAPTER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _build_tiny_adapter(base.path, staging)
        (staging / "dropkiln-tiny.json").write_text(
            json.dumps({"base": base.name, "base_fingerprint": base.fingerprint})
        )
        try:
            staging.rename(target)
        except OSError:
            if not (target / ADAPTER_FILE).is_file():  # not just another builder winning
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _build_tiny_adapter(base_folder: Path, folder: Path) -> None:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dropkiln.stages.models.tiny import seed_weights

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=_TINY_EMBEDDING,
    )
    encoder = CLIPVisionModelWithProjection(config)
    seed_weights(encoder, TINY_ADAPTER_SEED)
    encoder.save_pretrained(folder / IMAGE_ENCODER, safe_serialization=True)

    unet_config = UNet2DConditionModel.load_config(base_folder, subfolder="unet")
    cross = int(unet_config["cross_attention_dim"])
    generator = np.random.Generator(np.random.PCG64(TINY_ADAPTER_SEED + 1))

    def uniform(rows: int, columns: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(columns)
        values = (generator.random(rows * columns) * 2.0 - 1.0) * bound
        return torch.from_numpy(values.astype(np.float32).reshape(rows, columns))

    weights = {
        "image_proj.proj.weight": uniform(_IMAGE_TOKENS * cross, _TINY_EMBEDDING),
        "image_proj.proj.bias": uniform(1, _IMAGE_TOKENS * cross).reshape(-1),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    # diffusers numbers the cross-attention layers 1, 3, 5, … in the UNet's processor order
    for number, hidden in enumerate(_cross_attention_widths(base_folder)):
        key = 2 * number + 1
        weights[f"ip_adapter.{key}.to_k_ip.weight"] = uniform(hidden, cross)
        weights[f"ip_adapter.{key}.to_v_ip.weight"] = uniform(hidden, cross)
    save_file(weights, str(folder / ADAPTER_FILE))


def _cross_attention_widths(base_folder: Path) -> list[int]:
    """The width of every cross-attention layer, in the order diffusers numbers them."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(base_folder, subfolder="unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name.removesuffix(".processor"))
            widths.append(int(module.to_q.out_features))
    return widths


def load_image_encoder(
    adapter: Path, device: str, dtype: torch.dtype
) -> CLIPVisionModelWithProjection:
    """The CLIP image encoder beside an adapter file, from safetensors only."""
    from transformers import CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(adapter.parent / IMAGE_ENCODER),
            use_safetensors=True,
            local_files_only=True,
            dtype=dtype,
        )
    except (OSError, ValueError) as exc:
        raise StageError(
            f"reference adapter {adapter.name}: image encoder unusable: {exc}"
        ) from exc
    # transformers types Module.to through a decorator mypy reads as unbound
    return encoder.to(device)  # type: ignore[arg-type]


def attach_references(
    pipe: AdapterPipeline, adapter: Path, count: int, device: str, dtype: torch.dtype
) -> None:
    """``count`` copies of the adapter on ``pipe`` (one per reference image)."""
    pipe.register_modules(image_encoder=load_image_encoder(adapter, device, dtype))
    try:
        pipe.load_ip_adapter(
            str(adapter.parent),
            subfolder="",
            weight_name=[adapter.name] * count,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        detach_references(pipe)
        raise StageError(f"reference adapter {adapter.name} does not fit: {exc}") from exc


def detach_references(pipe: AdapterPipeline) -> None:
    """The pipeline as loaded: no adapter layers, no image encoder, no image processor (an
    SD 1.5 pipeline keeps the one diffusers made for the adapter's image size)."""
    pipe.unload_ip_adapter()
    pipe.register_modules(image_encoder=None, feature_extractor=None)


def reference_inputs(
    pipe: AdapterPipeline, references: list[ReferenceRef], where: str
) -> dict[str, list[Image.Image]]:
    """Each adapter copy's weight set on ``pipe``, and the pipeline argument: one image each."""
    pipe.set_ip_adapter_scale([reference.weight for reference in references])
    return {"ip_adapter_image": [_rgb(reference.image, where) for reference in references]}


def _rgb(path: str, where: str) -> Image.Image:
    import io

    from PIL import Image, UnidentifiedImageError

    from dropkiln.stages.dataset import UnsafeFile
    from dropkiln.stages.generation.controlnet import read_control_bytes

    try:
        with Image.open(io.BytesIO(read_control_bytes(path))) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, UnsafeFile) as exc:
        name = Path(path).name
        raise StageError(f"{where}: reference image {name} cannot be read: {exc}") from exc
