"""Writing a trained LoRA: kohya format (kohya, ComfyUI, A1111) and the diffusers/PEFT format.

The kohya file uses kohya's own module names (kohya_names) with ``lora_down``/``lora_up``
weights and an ``.alpha`` per module, and the ``ss_*``/``sshs_*`` metadata kohya writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_pipeline import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors.torch import save

from dropkiln.stages.base import atomic_path, write_atomic
from dropkiln.stages.models.hashes import LEGACY_LENGTH, LEGACY_OFFSET
from dropkiln.stages.training.adapters import TrainableModels
from dropkiln.stages.training.kohya_names import kohya_module_name

DIFFUSERS_FOLDER = "diffusers"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base/lora", "sd15": "stable-diffusion-v1/lora"}
_BASE_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}
_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models", "sd15": "diffusers"}


def kohya_state_dict(models: TrainableModels, kind: str) -> dict[str, torch.Tensor]:
    """Every trained component's LoRA under kohya's own module names (see kohya_names).

    Per module: ``NAME.lora_down.weight`` (peft's ``lora_A``), ``NAME.lora_up.weight``
    (``lora_B``) and ``NAME.alpha``; the scale is alpha / rank in both formats.
    """
    unet_config = dict(models.models["unet"].config)
    kohya: dict[str, torch.Tensor] = {}
    for component in models.models:
        for key, tensor in models.lora_state(component).items():
            module, _, part = key.rpartition(".lora_")
            name = kohya_module_name(component, module, kind, unet_config)
            role = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
            if name + "." + role in kohya:
                raise ValueError(f"two modules give the kohya name {name}")
            kohya[f"{name}.{role}"] = tensor
            kohya[f"{name}.alpha"] = torch.tensor(models.alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in sorted(kohya.items())}


def safetensors_hashes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` of a LoRA about to be written.

    Both are taken over the file safetensors makes of the tensors with only the ``ss_*``
    metadata (what kohya keeps fixed): the sha256 of its data section, and the sha256 of
    the 64 KiB at offset 1 MiB of the whole file, first 8 hex digits.
    """
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(tensors, training)
    header_length = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_length :]).hexdigest()
    legacy = hashlib.sha256(blob[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()
    return model_hash, legacy[:8]


def bucket_info(images: list[tuple[tuple[int, int], tuple[int, int]]]) -> dict[str, Any]:
    """kohya's ``bucket_info`` from (bucket, original size) per image, sizes as (w, h).

    ``buckets`` numbers the buckets by size and counts their images; the mean aspect-ratio
    error is how far, on average, an image's w/h is from its bucket's.
    """
    counts: dict[tuple[int, int], int] = {}
    for bucket, _ in images:
        counts[bucket] = counts.get(bucket, 0) + 1
    errors = [abs(b[0] / b[1] - o[0] / o[1]) for b, o in images]
    return {
        "buckets": {
            str(number): {"resolution": list(size), "count": counts[size]}
            for number, size in enumerate(sorted(counts))
        },
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }


def kohya_metadata(facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``ss_*``, ``sshs_*`` and ``modelspec.*`` header keys (all strings, as safetensors
    requires), in the shapes kohya's ``train_network.py`` writes them."""
    kind = facts["kind"]
    width, height = facts["resolution"]
    options = facts["options"]
    v_prediction = options.prediction_type == "v_prediction"
    buckets = bucket_info(facts["images"])
    sides = [side for size, _ in facts["images"] for side in size] or [width, height]
    name = facts["name"]
    total_batch = options.batch_size * options.gradient_accumulation
    hashes = facts["model_hashes"]
    dataset = {
        "is_dreambooth": True,
        "batch_size_per_device": options.batch_size,
        "num_train_images": facts["num_images"],
        "num_reg_images": 0,
        "resolution": [width, height],
        "enable_bucket": True,
        "min_bucket_reso": min(sides),
        "max_bucket_reso": max(sides),
        "tag_frequency": {name: facts["tag_frequency"]},
        "bucket_info": buckets,
        "subsets": [
            {
                "img_count": facts["num_images"],
                "num_repeats": 1,
                "color_aug": False,
                "flip_aug": options.flip_augment,
                "random_crop": False,
                "shuffle_caption": options.shuffle_tags,
                "keep_tokens": options.keep_tokens,
                "image_dir": name,
                "class_tokens": None,
                "is_reg": False,
            }
        ],
    }
    metadata: dict[str, Any] = {
        "ss_session_id": facts["session_id"],
        "ss_output_name": name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": options.rank,
        "ss_network_alpha": facts["alpha"],
        "ss_network_args": json.dumps({}),
        "ss_base_model_version": _BASE_VERSION[kind],
        "ss_sd_model_name": facts["model_name"],
        "ss_sd_model_hash": hashes.legacy,
        "ss_new_sd_model_hash": hashes.sha256,
        "ss_v2": False,
        "ss_clip_skip": None,  # the model's own layer: the last for SD 1.5, penultimate for SDXL
        "ss_resolution": f"({width}, {height})",
        "ss_enable_bucket": True,
        "ss_bucket_no_upscale": False,
        "ss_min_bucket_reso": min(sides),
        "ss_max_bucket_reso": max(sides),
        "ss_bucket_info": json.dumps(buckets),
        "ss_datasets": json.dumps([dataset]),
        "ss_steps": facts["steps"],
        "ss_epoch": facts["epoch"],
        "ss_num_epochs": facts["num_epochs"],
        "ss_max_train_steps": options.steps,
        "ss_num_train_images": facts["num_images"],
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": facts["batches_per_epoch"],
        "ss_batch_size_per_device": options.batch_size,
        "ss_total_batch_size": total_batch,
        "ss_gradient_accumulation_steps": options.gradient_accumulation,
        "ss_learning_rate": options.learning_rate,
        "ss_unet_lr": options.learning_rate,
        "ss_text_encoder_lr": options.text_encoder_learning_rate or options.learning_rate,
        "ss_network_train_unet_only": not options.train_text_encoder,
        "ss_lr_scheduler": options.lr_scheduler,
        "ss_lr_warmup_steps": options.lr_warmup_steps,
        "ss_optimizer": options.optimizer,
        "ss_max_grad_norm": options.max_grad_norm,
        "ss_mixed_precision": facts["mixed_precision"],
        "ss_gradient_checkpointing": facts["gradient_checkpointing"],
        "ss_cache_latents": True,
        "ss_seed": options.seed,
        "ss_noise_offset": options.noise_offset,
        "ss_min_snr_gamma": options.min_snr_gamma,
        "ss_zero_terminal_snr": options.zero_terminal_snr,
        "ss_v_parameterization": v_prediction,
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_flip_aug": options.flip_augment,
        "ss_shuffle_caption": options.shuffle_tags,
        "ss_keep_tokens": options.keep_tokens,
        "ss_caption_dropout_rate": options.caption_dropout,
        "ss_caption_tag_dropout_rate": options.tag_dropout,
        "ss_ema_decay": options.ema_decay,
        "ss_tag_frequency": json.dumps({name: facts["tag_frequency"]}),
        "ss_dataset_dirs": json.dumps({name: {"n_repeats": 1, "img_count": facts["num_images"]}}),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_training_started_at": facts["started_at"],
        "ss_training_finished_at": facts["finished_at"],
        "ss_training_comment": "trained by dropkiln",
    }
    text = {k: _metadata_text(v) for k, v in metadata.items()}
    model_hash, legacy_hash = safetensors_hashes(tensors, text)
    spec: dict[str, Any] = {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _ARCHITECTURE[kind],
        "modelspec.implementation": _IMPLEMENTATION[kind],
        "modelspec.title": name,
        "modelspec.author": "dropkiln",
        "modelspec.description": f"LoRA trained on dataset {name} by dropkiln",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.timestep_range": f"{options.timestep_min},{options.timestep_max}",
        "modelspec.date": facts["finished_date"],
        "modelspec.hash_sha256": "0x" + model_hash,
    }
    return text | {k: _metadata_text(v) for k, v in spec.items()}


def _metadata_text(value: object) -> str:
    if value is None:
        return "None"
    return str(value)


def write_kohya(path: Path, models: TrainableModels, facts: dict[str, Any]) -> Path:
    """NAME.safetensors in kohya format, written atomically."""
    tensors = kohya_state_dict(models, facts["kind"])
    return write_atomic(path, save(tensors, metadata=kohya_metadata(facts, tensors)))


def write_diffusers(
    folder: Path,
    pipeline_class: type[StableDiffusionLoraLoaderMixin | StableDiffusionXLLoraLoaderMixin],
    models: TrainableModels,
) -> Path:
    """``diffusers/pytorch_lora_weights.safetensors`` via the pipeline's own saver."""
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
