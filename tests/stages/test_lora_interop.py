"""dropkiln's kohya-format LoRA, read the way kohya sd-scripts, ComfyUI and A1111 read it.

Each test derives, from the real module trees of SDXL base and SD 1.5 (miniatures with
every block, layer and name of the published configs, from tests/topology.py), the key
names one tool accepts, and checks that every key of a file written by dropkiln's own
export path is accepted and none is ignored. The tools' rules are stated in words in each
test; the original (LDM/SGM) layout they build on is checked against diffusers' own
single-file converter first.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from ldm_checkpoint import _open_clip_keys, _unet_keys

from dropkiln.config import TrainSettings
from dropkiln.stages.models import CheckpointHashes
from dropkiln.stages.training.adapters import TEXT_TARGET_MODULES, lora_adapters
from dropkiln.stages.training.lora_export import write_kohya
from tests.topology import real_topology

KINDS = ["sdxl", "sd15"]
SCALE = 10
# Every kind of UNet layer a LoRA may target: attention, feed-forward, transformer
# projections, resnet convolutions and time projection, shortcut, down- and upsamplers.
UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv",
    "upsamplers.0.conv",
]  # fmt: skip
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
CLIP_PARTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "mlp.fc1", "mlp.fc2"]  # fmt: skip
Report = dict[str, tuple[int, int]]
REPORT: dict[str, Report] = {}


@pytest.fixture(scope="module", params=KINDS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(kind, keys of the kohya file dropkiln wrote, the untouched models for the rules)."""
    from safetensors import safe_open

    kind = request.param
    models = real_topology(kind, SCALE)
    pipe = SimpleNamespace(components=models, **models)
    options = TrainSettings(rank=4, alpha=2.0, train_text_encoder=True,
                            target_modules=UNET_TARGETS)  # fmt: skip
    path = tmp_path_factory.mktemp(kind) / "cats.safetensors"
    with lora_adapters(pipe, options, gradient_checkpointing=False) as trainable:
        injected = sum(len(trainable.lora_state(c)) for c in trainable.models) // 2
        write_kohya(path, trainable, _facts(kind, options))
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert len(keys) == 3 * injected  # down, up and alpha for every module peft trained
    return kind, keys, real_topology(kind, SCALE, device="meta")


def _facts(kind: str, options: TrainSettings) -> dict[str, Any]:
    return {
        "name": "cats", "kind": kind, "model_name": f"tiny-{kind}",
        "model_hashes": CheckpointHashes("0" * 64, "0" * 8), "model_fingerprint": "0" * 64,
        "session_id": 1, "images": [((64, 64), (64, 64))], "batches_per_epoch": 1,
        "epoch": 1, "num_epochs": 1, "resolution": (64, 64), "options": options,
        "alpha": options.alpha, "steps": 1, "num_images": 1, "tag_frequency": {"cat": 1},
        "mixed_precision": "no", "gradient_checkpointing": False, "started_at": time.time(),
        "finished_at": time.time(), "finished_date": "2026-01-01",
    }  # fmt: skip


def ldm_unet(unet: Any) -> dict[str, Any]:
    """The UNet's weights in the original checkpoint layout (``model.diffusion_model.*``
    without that prefix), keyed like ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``."""
    return _unet_keys(unet.state_dict(), dict(unet.config))


def ldm_text(models: dict[str, Any]) -> dict[str, Any]:
    """The text encoders in the original layout: SD 1.5 ``transformer.text_model.…``
    (under ``cond_stage_model``); SDXL embedder 0 ``0.transformer.text_model.…`` and
    embedder 1 (OpenCLIP) ``1.model.transformer.resblocks.…`` (under ``conditioner``)."""

    def clip(model: Any) -> dict[str, Any]:
        # original checkpoints keep CLIP's text_model level, which transformers 5 dropped
        return {"text_model." + k.removeprefix("text_model."): v
                for k, v in model.state_dict().items()}  # fmt: skip

    if "text_encoder_2" not in models:
        return {f"transformer.{k}": v for k, v in clip(models["text_encoder"]).items()}
    layout = {f"0.transformer.{k}": v for k, v in clip(models["text_encoder"]).items()}
    open_clip = _open_clip_keys(models["text_encoder_2"].state_dict())
    return layout | {f"1.model.{k}": v for k, v in open_clip.items()}


def test_the_original_layout_is_the_one_diffusers_converts(exported: Any) -> None:
    """The LDM key layout the rules below start from is exactly what diffusers' single-file
    converter turns into the diffusers UNet of the same config (same names, same shapes)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, _, models = exported
    unet = models["unet"]
    original = {f"model.diffusion_model.{k}": v for k, v in ldm_unet(unet).items()}
    converted = convert_ldm_unet_checkpoint(original, dict(unet.config))
    expected = unet.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def _split(key: str) -> tuple[str, str]:
    name, _, part = key.partition(".")
    return name, part


def _tally(tool: str, kind: str, keys: set[str], accepted: Callable[[str], bool]) -> None:
    ignored = sorted(k for k in keys if not accepted(k))
    REPORT.setdefault(tool, {})[kind] = (len(keys) - len(ignored), len(ignored))
    print(f"{tool} {kind}: {len(keys) - len(ignored)} keys accepted, {len(ignored)} ignored")
    assert not ignored, f"{tool} ignores {len(ignored)} keys, e.g. {ignored[:3]}"


def test_kohya_sd_scripts_loads_every_key(exported: Any) -> None:
    """kohya sd-scripts (networks/lora.py; sdxl_merge_lora.py, --network_weights).

    kohya loads a LoRA into the model it builds itself. For SDXL that UNet has the original
    SGM layout, module for module the checkpoint's ``model.diffusion_model.*`` names; for
    SD 1.5 it has diffusers' module names. Its text encoders are transformers CLIP models
    with their ``text_model`` level. It makes a LoRA module for every Linear or Conv2d
    inside a module of class Transformer2DModel, ResnetBlock2D, Downsample2D or Upsample2D
    (UNet) or CLIPAttention/CLIPMLP (text encoders), named by prefix + the module's path
    with dots turned into underscores; the prefix is ``lora_unet``, ``lora_te`` with one
    text encoder, ``lora_te1``/``lora_te2`` with two. The file is then loaded non-strictly:
    ``NAME.lora_down.weight``, ``NAME.lora_up.weight`` and ``NAME.alpha`` of such a module
    are used, every other key is dropped without a word.
    """
    kind, keys, models = exported
    names: set[str] = set()
    if kind == "sdxl":
        # every entry of input_blocks (but conv_in, input_blocks.0), middle_block and
        # output_blocks is one of the four classes; Linear/Conv2d weights are 2-D or 4-D
        for key, tensor in ldm_unet(models["unet"]).items():
            block = re.match(r"(input_blocks\.[1-9]\d*|middle_block|output_blocks\.\d+)\.", key)
            if block and key.endswith(".weight") and tensor.dim() >= 2:
                names.add("lora_unet_" + key.removesuffix(".weight").replace(".", "_"))
    else:
        names |= _by_class(
            models["unet"],
            "lora_unet",
            ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"),
        )
    texts = [c for c in ("text_encoder", "text_encoder_2") if c in models]
    for number, component in enumerate(texts, start=1):
        prefix = "lora_te" if len(texts) == 1 else f"lora_te{number}"
        model = models[component]
        level = "" if hasattr(model, "text_model") else "text_model."
        names |= _by_class(model, prefix, ("CLIPAttention", "CLIPMLP"), level)
    _tally("kohya", kind, keys, lambda k: _split(k)[0] in names and _split(k)[1] in PARTS)


def _by_class(model: Any, prefix: str, classes: tuple[str, ...], level: str = "") -> set[str]:
    names = set()
    for path, module in model.named_modules():
        if type(module).__name__ in classes:
            for child, layer in module.named_modules():
                if type(layer).__name__ in ("Linear", "Conv2d"):
                    full = f"{level}{path}.{child}"
                    names.add(f"{prefix}_{full.replace('.', '_')}")
    return names


def test_comfyui_loads_every_key(exported: Any) -> None:
    """ComfyUI (comfy/lora.py ``model_lora_keys_unet``, ``model_lora_keys_clip``,
    ``load_lora``).

    ComfyUI holds the UNet in the original layout. Every UNet weight ``X.weight`` of it
    gives the LoRA name ``lora_unet_`` + X with dots as underscores; through its
    diffusers→original table, the diffusers path of the same weight gives another. For the
    text encoders it knows, per encoder layer b and per part among self_attn q/k/v/out_proj
    and mlp fc1/fc2: ``lora_te_text_model_encoder_layers_{b}_{part}`` and ``lora_te1_…``
    for CLIP-L, and, when CLIP-L is there too (SDXL), ``lora_te2_…`` for CLIP-G. A file
    key is used when it is ``NAME.lora_up.weight``, ``NAME.lora_down.weight`` or
    ``NAME.alpha`` of a known name; any other key is logged as "lora key not loaded".
    """
    kind, keys, models = exported
    unet = models["unet"]
    names = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_")
             for k in [*ldm_unet(unet), *unet.state_dict()] if k.endswith(".weight")}  # fmt: skip
    encoders = ["lora_te", "lora_te1"] if kind == "sd15" else ["lora_te1"]
    clip_g = ["lora_te2"] if kind == "sdxl" else []
    for prefixes, component in ((encoders, "text_encoder"), (clip_g, "text_encoder_2")):
        if not prefixes:
            continue
        model = models[component]
        layers = (model.text_model if hasattr(model, "text_model") else model).encoder.layers
        for b in range(len(layers)):
            for part in CLIP_PARTS:
                for prefix in prefixes:
                    names.add(f"{prefix}_text_model_encoder_layers_{b}_{part.replace('.', '_')}")
    _tally("ComfyUI", kind, keys, lambda k: _split(k)[0] in names and _split(k)[1] in PARTS)


# A1111's name conversion (extensions-builtin/Lora/networks.py, convert_diffusers_name_to_
# compvis), restated: diffusers-style UNet names map onto the original layout with three
# entries per block; text-encoder names map onto its conditioner's module names.
RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3",
                   "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}  # fmt: skip


def a1111_candidate(name: str, sd2: bool = False) -> str:
    """The module name A1111 first looks up for a LoRA module name."""

    def suffix(kind: str, rest: str) -> str:
        return RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest

    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + block * 3 + index
        return (
            f"diffusion_model_input_blocks_{slot}_{int(kind == 'attentions')}_{suffix(kind, rest)}"
        )
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        slot = 1 if m[1] == "attentions" else int(m[2]) * 2
        return f"diffusion_model_middle_block_{slot}_{suffix(m[1], m[3])}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = block * 3 + index
        return (
            f"diffusion_model_output_blocks_{slot}_{int(kind == 'attentions')}_{suffix(kind, rest)}"
        )
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        block = int(m[1])
        return f"diffusion_model_output_blocks_{2 + block * 3}_{2 if block > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
        return f"1_model_transformer_resblocks_{m[1]}_{rest.replace('self_attn', 'attn')}"
    return name


def test_a1111_loads_every_key(exported: Any) -> None:
    """AUTOMATIC1111 (extensions-builtin/Lora/networks.py ``load_network``).

    A1111 names every module of its loaded checkpoint: the UNet ``diffusion_model_…`` in
    the original layout; SD 1.5's text encoder ``transformer_text_model_…``; SDXL's two
    embedders ``0_transformer_text_model_…`` (CLIP-L) and ``1_model_transformer_…``
    (OpenCLIP, whose attention is one MultiheadAttention with a fused q/k/v projection and
    an ``out_proj`` child). A file key is split at its first dot into a LoRA module name
    and a weight part. The name goes through the conversion above; if no module has the
    result, a name ending in ``_q_proj``/``_k_proj``/``_v_proj`` is tried without that
    ending (the fused attention); then a name holding ``lora_unet`` is tried with that
    replaced by ``diffusion_model``, or one holding ``lora_te1_text_model`` with that
    replaced by ``0_transformer_text_model`` and then ``transformer_text_model``. A key
    whose module is still unknown is reported under "Failed to match keys" and ignored.
    A matched module needs both ``lora_up.weight`` and ``lora_down.weight`` (``alpha`` is
    optional), and a fused attention needs q, k, v and out all present, or it is skipped.
    """
    kind, keys, models = exported
    original = {f"diffusion_model.{k}": v for k, v in ldm_unet(models["unet"]).items()}
    original |= ldm_text(models)
    modules = {key.rsplit(".", 1)[0].replace(".", "_") for key in original}
    fused = {k.removesuffix(".in_proj_weight").replace(".", "_")
             for k in original if k.endswith(".in_proj_weight")}  # fmt: skip
    modules |= fused

    def network_key(name: str) -> str | None:
        """A1111's key for the LoRA module ``name``, or None when no module matches."""
        candidate = a1111_candidate(name)
        if candidate in modules:
            return candidate
        if (m := re.match(r"(.*)_([qkv]_proj)$", candidate)) and m[1] in fused:
            return candidate
        if "lora_unet" in name:
            fallback = name.replace("lora_unet", "diffusion_model")
            return fallback if fallback in modules else None
        if "lora_te1_text_model" in name:
            for target in ("0_transformer_text_model", "transformer_text_model"):
                if (fallback := name.replace("lora_te1_text_model", target)) in modules:
                    return fallback
        return None

    held: dict[str, set[str]] = {}
    for key in keys:
        name, part = _split(key)
        if (found := network_key(name)) is not None:
            held.setdefault(found, set()).add(part)
    for found, parts in held.items():
        assert {"lora_up.weight", "lora_down.weight"} <= parts, found
    for attention in fused:
        present = {p for p in ("q", "k", "v", "out") if f"{attention}_{p}_proj" in held}
        assert present in (set(), {"q", "k", "v", "out"}), attention
    _tally("A1111", kind, keys, lambda k: network_key(_split(k)[0]) is not None)


@pytest.fixture(scope="module", autouse=True)
def _print_report() -> Iterator[None]:
    yield
    for tool, kinds in REPORT.items():
        for kind, (accepted, ignored) in sorted(kinds.items()):
            print(f"{tool:8} {kind}: accepted {accepted}, ignored {ignored}")


def test_text_targets_are_the_ones_every_tool_maps() -> None:
    assert set(TEXT_TARGET_MODULES) == {"q_proj", "k_proj", "v_proj", "out_proj"}


@pytest.mark.parametrize("kind", KINDS)
def test_kohya_preset_trains_what_kohya_trains_by_default(kind: str, tmp_path: Any) -> None:
    """``target_modules = "kohya"`` gives the modules kohya's networks/lora.py makes LoRA
    modules for when no conv_dim is given: every Linear, and every Conv2d with a 1x1
    kernel, inside a Transformer2DModel (SGM: a SpatialTransformer, entry 1 of a block
    with attention: its proj_in, proj_out and everything in its transformer_blocks), and every
    Linear inside CLIPAttention and CLIPMLP of the text encoders. The file's keys are
    exactly those names, each with down, up and alpha."""
    from safetensors import safe_open

    models = real_topology(kind, SCALE)
    pipe = SimpleNamespace(components=models, **models)
    options = TrainSettings(rank=4, alpha=2.0, train_text_encoder=True, target_modules="kohya")
    path = tmp_path / "cats.safetensors"
    with lora_adapters(pipe, options, gradient_checkpointing=False) as trainable:
        write_kohya(path, trainable, _facts(kind, options))
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    meta = real_topology(kind, SCALE, device="meta")
    names: set[str] = set()
    if kind == "sdxl":
        for key, tensor in ldm_unet(meta["unet"]).items():
            inside = re.match(
                r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\."
                r"(proj_in|proj_out|transformer_blocks\.)",
                key,
            )
            if inside and key.endswith(".weight") and tensor.dim() >= 2:
                names.add("lora_unet_" + key.removesuffix(".weight").replace(".", "_"))
    else:
        for path_name, module in meta["unet"].named_modules():
            if type(module).__name__ != "Transformer2DModel":
                continue
            for child, layer in module.named_modules():
                linear = type(layer).__name__ == "Linear"
                pointwise = type(layer).__name__ == "Conv2d" and layer.kernel_size == (1, 1)
                if linear or pointwise:
                    names.add(f"lora_unet_{path_name}.{child}".replace(".", "_"))
    texts = [c for c in ("text_encoder", "text_encoder_2") if c in meta]
    for number, component in enumerate(texts, start=1):
        prefix = "lora_te" if len(texts) == 1 else f"lora_te{number}"
        model = meta[component]
        level = "" if hasattr(model, "text_model") else "text_model."
        names |= _by_class(model, prefix, ("CLIPAttention", "CLIPMLP"), level)
    assert {_split(k)[0] for k in keys} == names
    assert all(_split(k)[1] in PARTS for k in keys) and len(keys) == 3 * len(names)
