"""Writing a trained LoRA: kohya format (ComfyUI, A1111) and the diffusers/PEFT format.

The kohya file uses diffusers-style module names after ``lora_unet_`` / ``lora_te1_`` /
``lora_te2_`` with ``lora_down``/``lora_up`` weights and an ``.alpha`` per module; both
ComfyUI and A1111 map these names, and diffusers' ``load_lora_weights`` reads them too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.base import atomic_path, write_atomic

if TYPE_CHECKING:
    import torch

    from dropkiln.stages.training.adapters import TrainableModels

DIFFUSERS_FOLDER = "diffusers"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base/lora", "sd15": "stable-diffusion-v1/lora"}
_BASE_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}
_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models", "sd15": "diffusers"}


def kohya_state_dict(models: TrainableModels) -> dict[str, torch.Tensor]:
    """PEFT state dicts of every trained component → kohya keys, alpha as configured."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed: dict[str, torch.Tensor] = {}
    for component in models.models:
        for key, tensor in models.lora_state(component).items():
            prefixed[f"{component}.{key}"] = tensor
    kohya: dict[str, torch.Tensor] = convert_state_dict_to_kohya(prefixed)
    # diffusers writes alpha = rank; ours may differ (scale = alpha / rank in both formats).
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(models.alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in sorted(kohya.items())}


def tensor_data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's ``sshs_model_hash``: sha256 of the safetensors data section (not the header)."""
    from safetensors.torch import save

    blob = save(tensors)
    header_length = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_length :]).hexdigest()


def kohya_metadata(facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` header keys (all strings, as safetensors requires)."""
    kind = facts["kind"]
    width, height = facts["resolution"]
    options = facts["options"]
    model_hash = tensor_data_sha256(tensors)
    v_prediction = options.prediction_type == "v_prediction"
    metadata: dict[str, Any] = {
        "ss_output_name": facts["name"],
        "ss_network_module": "networks.lora",
        "ss_network_dim": options.rank,
        "ss_network_alpha": facts["alpha"],
        "ss_network_args": json.dumps({}),
        "ss_base_model_version": _BASE_VERSION[kind],
        "ss_sd_model_name": facts["model_name"],
        "ss_sd_model_hash": facts["model_fingerprint"],
        "ss_v2": False,
        "ss_resolution": f"({width}, {height})",
        "ss_steps": facts["steps"],
        "ss_max_train_steps": options.steps,
        "ss_num_train_images": facts["num_images"],
        "ss_batch_size_per_device": options.batch_size,
        "ss_gradient_accumulation_steps": options.gradient_accumulation,
        "ss_learning_rate": options.learning_rate,
        "ss_unet_lr": options.learning_rate,
        "ss_text_encoder_lr": options.text_encoder_learning_rate or options.learning_rate,
        "ss_network_train_unet_only": not options.train_text_encoder,
        "ss_lr_scheduler": options.lr_scheduler,
        "ss_lr_warmup_steps": options.lr_warmup_steps,
        "ss_optimizer": options.optimizer,
        "ss_mixed_precision": facts["mixed_precision"],
        "ss_gradient_checkpointing": facts["gradient_checkpointing"],
        "ss_seed": options.seed,
        "ss_noise_offset": options.noise_offset,
        "ss_min_snr_gamma": options.min_snr_gamma,
        "ss_zero_terminal_snr": options.zero_terminal_snr,
        "ss_v_parameterization": v_prediction,
        "ss_flip_aug": options.flip_augment,
        "ss_shuffle_caption": options.shuffle_tags,
        "ss_keep_tokens": options.keep_tokens,
        "ss_caption_dropout_rate": options.caption_dropout,
        "ss_caption_tag_dropout_rate": options.tag_dropout,
        "ss_ema_decay": options.ema_decay,
        "ss_tag_frequency": json.dumps({facts["name"]: facts["tag_frequency"]}),
        "ss_dataset_dirs": json.dumps(
            {facts["name"]: {"n_repeats": 1, "img_count": facts["num_images"]}}
        ),
        "ss_training_started_at": facts["started_at"],
        "ss_training_finished_at": facts["finished_at"],
        "ss_training_comment": "trained by dropkiln",
        "sshs_model_hash": model_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _ARCHITECTURE[kind],
        "modelspec.implementation": _IMPLEMENTATION[kind],
        "modelspec.title": facts["name"],
        "modelspec.author": "dropkiln",
        "modelspec.description": f"LoRA trained on dataset {facts['name']} by dropkiln",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v"
        if options.prediction_type == "v_prediction"
        else "epsilon",
        "modelspec.timestep_range": f"{options.timestep_min},{options.timestep_max}",
        "modelspec.date": facts["finished_date"],
        "modelspec.hash_sha256": "0x" + model_hash,
    }
    return {k: _metadata_text(v) for k, v in metadata.items()}


def _metadata_text(value: Any) -> str:
    if value is None:
        return "None"
    return str(value)


def write_kohya(path: Path, models: TrainableModels, facts: dict[str, Any]) -> Path:
    """NAME.safetensors in kohya format, written atomically."""
    from safetensors.torch import save

    tensors = kohya_state_dict(models)
    return write_atomic(path, save(tensors, metadata=kohya_metadata(facts, tensors)))


def write_diffusers(folder: Path, pipeline_class: Any, models: TrainableModels) -> Path:
    """``diffusers/pytorch_lora_weights.safetensors`` via the pipeline's own saver."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers: dict[str, Any] = {}
    names = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
    for component in models.models:
        state = convert_state_dict_to_diffusers(models.lora_state(component))
        layers[f"{names[component]}_lora_layers"] = state
        layers[f"{names[component]}_lora_adapter_metadata"] = models.adapter_config(component)
    target = folder / DIFFUSERS_WEIGHTS
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora.", dir=folder))
    try:
        pipeline_class.save_lora_weights(staging, safe_serialization=True, **layers)
        with atomic_path(target) as tmp:
            shutil.copyfile(staging / DIFFUSERS_WEIGHTS, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
