"""LoRA files into a pipeline for generation: kohya files (SGM or diffusers UNet naming,
``lora_te_``/``lora_te1_``/``lora_te2_`` text encoders) and diffusers/PEFT files.

diffusers reads and converts every format (``lora_state_dict``) and loads the UNet part.
The text-encoder part is attached with peft directly, as training does: transformers'
``load_adapter`` (which diffusers would call) refuses peft releases older than the one it
was built against, and transformers 5.24 asks for a peft that does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.base import StageError

if TYPE_CHECKING:
    from dropkiln.stages.generate import LoraFile

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LoraMismatch(ValueError):
    """The file's LoRA does not fit the pipeline's models."""


def load_loras(pipe: Any, loras: Sequence[LoraFile], model_name: str) -> None:
    """A job's LoRAs into ``pipe`` at their weights, as adapters ``dropkiln_0``, ``_1``...;
    a file that does not fit the model is a StageError that names it."""
    names = []
    for number, lora in enumerate(loras):
        adapter = f"dropkiln_{number}"
        try:
            load_lora(pipe, Path(lora.path), adapter)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise StageError(f"LoRA {lora.name} does not fit {model_name}: {exc}") from exc
        names.append(adapter)
    if names:
        pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])


def load_lora(pipe: Any, path: Path, adapter: str) -> None:
    """Add the LoRA in ``path`` to ``pipe`` as adapter ``adapter`` (UNet and text encoders)."""
    state, alphas, metadata = pipe.lora_state_dict(
        str(path.parent),
        weight_name=path.name,
        unet_config=pipe.unet.config,
        local_files_only=True,
        return_lora_metadata=True,
    )
    if not state or not all("lora" in key for key in state):
        raise LoraMismatch(f"{path.name} holds no LoRA weights diffusers can read")
    known = ("unet.", *(f"{name}." for name in TEXT_ENCODERS))
    if stray := [key for key in state if not key.startswith(known)]:
        raise LoraMismatch(f"{len(stray)} keys of {path.name} name no model part, e.g. {stray[0]}")
    pipe.load_lora_into_unet(
        state,
        network_alphas=alphas,
        unet=pipe.unet,
        adapter_name=adapter,
        metadata=metadata,
        _pipeline=pipe,
    )
    for name in TEXT_ENCODERS:
        model = getattr(pipe, name, None)
        part = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
        if not part:
            continue
        if model is None:
            raise LoraMismatch(f"{path.name} has {name} weights; the model has no {name}")
        _attach_text_lora(model, name, part, alphas, metadata, adapter)


def _attach_text_lora(
    model: Any,
    prefix: str,
    state: dict[str, Any],
    alphas: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    adapter: str,
) -> None:
    """What diffusers' text-encoder loader does, with peft's injection instead of
    transformers' ``load_adapter``."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if "text_model" not in dict(model.named_children()):
        # transformers 5 flattened CLIPTextModel; files keep the text_model level. (The
        # module tree decides: render.py gives a flat model a ``text_model`` alias.)
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    ranks = {k: v.shape[1] for k, v in state.items() if k.endswith(".lora_B.weight")}
    if alphas is not None:
        alphas = {
            k.removeprefix(prefix + "."): v for k, v in alphas.items() if k.split(".")[0] == prefix
        }
    if metadata is not None:
        metadata = {
            k.removeprefix(prefix + "."): v
            for k, v in metadata.items()
            if k.startswith(prefix + ".")
        } or None
    config = _create_lora_config(state, alphas, metadata, ranks, is_unet=False)
    inject_adapter_in_model(config, model, adapter_name=adapter)
    configs = dict(getattr(model, "peft_config", None) or {})
    configs[adapter] = config
    model.peft_config = configs
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise LoraMismatch(
            f"{len(unexpected)} {prefix} LoRA weights match no module, e.g. {unexpected[0]}"
        )
    model.to(device=model.device, dtype=model.dtype)
