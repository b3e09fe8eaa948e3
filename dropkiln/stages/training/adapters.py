"""LoRA adapters on the warm pipeline's models: add for a training run, remove afterwards.

The pipeline is shared with later jobs, so training leaves it as it found it: adapters
unloaded, gradient checkpointing off, eval mode, no gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from transformers.modeling_utils import PreTrainedModel

from dropkiln.options import TrainSettings
from dropkiln.stages.training.pipeline import TrainingPipeline

ADAPTER = "dropkiln_train"
TrainedModel = ModelMixin | PreTrainedModel
"""A diffusers UNet, or a transformers text encoder."""
TEXT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# kohya's networks/lora.py without conv_dim: every Linear and 1x1 Conv2d inside a
# Transformer2DModel (attention, feed-forward, the block's proj_in/proj_out) and, in the
# text encoders, inside CLIPAttention and CLIPMLP.
KOHYA_UNET_TARGETS = [*ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
KOHYA_TEXT_TARGETS = [*TEXT_TARGET_MODULES, "fc1", "fc2"]
TARGET_PRESETS = {
    "attention": (ATTENTION_TARGETS, TEXT_TARGET_MODULES),
    "kohya": (KOHYA_UNET_TARGETS, KOHYA_TEXT_TARGETS),
}


def target_modules(options: TrainSettings, component: str) -> list[str]:
    """The module names peft targets in ``component``: a preset's, or the listed ones (UNet)
    with the attention set in the text encoders."""
    targets = options.target_modules
    unet, text = TARGET_PRESETS[targets] if isinstance(targets, str) else (targets, None)
    if component == "unet":
        return list(unet)
    return list(text or TEXT_TARGET_MODULES)


@dataclass
class TrainableModels:
    """The models that carry this run's LoRA, by pipeline component name."""

    models: dict[str, TrainedModel]
    """The UNet, and the text encoders when they are trained."""
    rank: int
    alpha: float
    trainable: dict[str, torch.nn.Parameter] = field(default_factory=dict)

    def parameters(self, component: str | None = None) -> list[torch.nn.Parameter]:
        return [
            p
            for name, p in self.trainable.items()
            if component is None or name.startswith(component + ".")
        ]

    def lora_state(self, component: str) -> dict[str, torch.Tensor]:
        """The component's LoRA weights in PEFT key format (no adapter name)."""
        state: dict[str, torch.Tensor] = get_peft_model_state_dict(
            self.models[component], adapter_name=ADAPTER
        )
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def adapter_config(self, component: str) -> dict[str, Any]:
        config: dict[str, Any] = _peft_configs(self.models[component])[ADAPTER].to_dict()
        return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


@contextmanager
def lora_adapters(
    pipe: TrainingPipeline, options: TrainSettings, gradient_checkpointing: bool
) -> Iterator[TrainableModels]:
    """Add this run's LoRA to the UNet (and text encoders when trained); remove it after."""
    rank = options.rank
    alpha = float(options.alpha if options.alpha is not None else options.rank)
    components = ["unet"]
    if options.train_text_encoder:
        components += [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None)]
    models: dict[str, TrainedModel] = {name: getattr(pipe, name) for name in components}
    for model in _frozen_parts(pipe):
        model.requires_grad_(False)
    try:
        for name, model in models.items():
            targets = target_modules(options, name)
            settings: dict[str, Any] = {"r": rank, "lora_alpha": alpha, "init_lora_weights": True}
            _attach(model, LoraConfig(target_modules=list(targets), **settings))
            if gradient_checkpointing:
                _enable_checkpointing(model)
            model.train()
        trainable: dict[str, torch.nn.Parameter] = {}
        for name, model in models.items():
            for param_name, param in model.named_parameters():
                if param.requires_grad:
                    # LoRA weights train in fp32 even when the frozen base is half precision.
                    param.data = param.data.float()
                    trainable[f"{name}.{param_name}"] = param
        if not trainable:
            raise ValueError(f"no module matched target_modules={options.target_modules}")
        yield TrainableModels(models, rank, alpha, trainable)
    finally:
        for model in models.values():
            _remove_adapter(model)
            _disable_checkpointing(model)
            model.eval()
            model.requires_grad_(False)


def _attach(model: TrainedModel, config: LoraConfig) -> None:
    """Inject this run's adapter with peft itself and make it the only active one.

    transformers' ``add_adapter`` refuses peft releases older than the one it was built
    against (5.24 wants a peft that does not exist yet), so the models get their layers from
    peft directly, as diffusers' own loaders do; ``peft_config`` is kept for the exporters.
    """
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    # peft and transformers each declare their own config type for this attribute
    configs: dict[str, Any] = {**_peft_configs(model), ADAPTER: config}
    model.peft_config = configs
    for layer in _tuner_layers(model):
        # Only this run's adapter may shape the training forward pass.
        layer.set_adapter(ADAPTER)


def _peft_configs(model: torch.nn.Module) -> dict[str, LoraConfig]:
    """The adapters' configs peft keeps on the model (none: empty)."""
    configs: dict[str, LoraConfig] = getattr(model, "peft_config", None) or {}
    return configs


def _tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _frozen_parts(pipe: TrainingPipeline) -> list[torch.nn.Module]:
    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]


def _enable_checkpointing(model: TrainedModel) -> None:
    if isinstance(model, ModelMixin):
        model.enable_gradient_checkpointing()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _disable_checkpointing(model: TrainedModel) -> None:
    if isinstance(model, ModelMixin):
        model.disable_gradient_checkpointing()
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()


def _remove_adapter(model: TrainedModel) -> None:
    config = _peft_configs(model)
    if ADAPTER not in config:
        return
    if any(name != ADAPTER for name in config):
        # Other adapters live on this model too: delete only ours.
        for layer in _tuner_layers(model):
            layer.delete_adapter(ADAPTER)
        del config[ADAPTER]
        return
    recurse_remove_peft_layers(model)
    del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
