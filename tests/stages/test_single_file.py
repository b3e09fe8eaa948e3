"""Downloaded single-file checkpoints load with nothing but the file.

Three checks against the outside: the shipped configs give the published parameter counts;
the locally built tokenizers give CLIP's published token ids; and real-topology miniatures
written in the original key layout load through the path a real file takes and render the
pixels of their diffusers twin.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from dropkiln.stages.base import StageError
from dropkiln.stages.models import SHIPPED_CONFIGS, load_pipeline, resolve_model

# ---------------------------------------------------------------- a) parameter counts
# Published figures, counted by each library's own classes from the released configs:
# - SD 1.5 UNet 859,520,964: diffusers' ModelMixin.num_parameters docstring example
#   (runwayml/stable-diffusion-v1-5, subfolder "unet").
# - SDXL base UNet 2,567,463,684 ("2.6B" in Podell et al. 2023, Table 1); diffusers'
#   DreamBooth-LoRA training logs print "unet params = 2567463684".
# - AutoencoderKL 83,653,863 (the same for SD 1.5 and SDXL; "83M" of the SD model card).
# - CLIP ViT-L/14 text model 123,060,480 (the "123M text encoder" of the SD 1.5 model card;
#   123,650,304 with SD3's 768×768 text projection).
# - OpenCLIP ViT-bigG/14 text model with projection 694,659,840 (diffusers' SD3 memory
#   table lists text_encoder_2 at 694659840).
PUBLISHED_COUNTS = {
    ("sd15", "unet"): 859_520_964,
    ("sdxl", "unet"): 2_567_463_684,
    ("sd15", "vae"): 83_653_863,
    ("sdxl", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


def _meta_model(folder: Path, component: str) -> Any:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = folder / component
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path))
        if component == "vae":
            return AutoencoderKL.from_config(AutoencoderKL.load_config(path))
        config = CLIPTextConfig.from_pretrained(path)
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return cls(config)


@pytest.mark.parametrize(("kind", "component"), list(PUBLISHED_COUNTS))
def test_shipped_configs_give_the_published_parameter_counts(kind: str, component: str) -> None:
    model = _meta_model(SHIPPED_CONFIGS / kind, component)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_COUNTS[kind, component]


@pytest.mark.parametrize(
    ("kind", "component", "open_clip_config"),
    [
        ("sd15", "text_encoder", "ViT-L-14.json"),
        ("sdxl", "text_encoder", "ViT-L-14.json"),
        ("sdxl", "text_encoder_2", "ViT-bigG-14.json"),
    ],
)
def test_text_encoder_configs_match_open_clip(
    kind: str, component: str, open_clip_config: str
) -> None:
    """open-clip-torch ships the text tower shapes of both encoders; ours must agree."""
    import importlib.metadata

    dist = importlib.metadata.distribution("open-clip-torch")
    shipped = json.loads(
        Path(str(dist.locate_file(f"open_clip/model_configs/{open_clip_config}"))).read_text()
    )
    text = shipped["text_cfg"]
    ours = json.loads((SHIPPED_CONFIGS / kind / component / "config.json").read_text())
    assert ours["hidden_size"] == text["width"]
    assert ours["num_attention_heads"] == text["heads"]
    assert ours["num_hidden_layers"] == text["layers"]
    assert ours["max_position_embeddings"] == text["context_length"]
    assert ours["vocab_size"] == text["vocab_size"]
    assert ours["intermediate_size"] == 4 * text["width"]
    if component == "text_encoder_2":
        assert ours["projection_dim"] == shipped["embed_dim"]


COMPONENTS = {
    "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"],
    "sd15": ["unet", "vae", "text_encoder"],
}


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_miniatures_have_every_tensor_of_the_real_model(kind: str, tmp_path: Path) -> None:
    """Same names and ranks as the full-size model the shipped configs describe; only the
    widths differ, so the miniature's single file has the real file's tensor names."""
    from miniatures import miniature_configs

    configs = miniature_configs(kind, tmp_path)
    for component in COMPONENTS[kind]:
        real = _meta_model(SHIPPED_CONFIGS / kind, component).state_dict()
        mini = _meta_model(configs, component).state_dict()
        assert real.keys() == mini.keys(), component
        assert all(real[k].dim() == mini[k].dim() for k in real), component
        assert sum(v.numel() for v in mini.values()) < sum(v.numel() for v in real.values()) / 20


# ---------------------------------------------------------------- b) tokenizer ids
# CLIP's published ids: "a photo of a cat"/"a photo of a dog" are asserted against the
# openai/clip-vit-base-patch32 tokenizer in elixir-nx/bumblebee
# (test/bumblebee/text/clip_tokenizer_test.exs); "Hello, world!" → 3306 267 1002 256 is
# the same vocabulary's reading, as other CLIP ports assert. 49406/49407 are
# <|startoftext|>/<|endoftext|>, the last two of the 49,408 tokens.
PUBLISHED_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "A  PHOTO of a Cat": [49406, 320, 1125, 539, 320, 2368, 49407],
}


@pytest.mark.parametrize("text", list(PUBLISHED_IDS))
def test_local_tokenizer_gives_clips_published_ids(text: str) -> None:
    from dropkiln.stages.models.clip_tokenizer import clip_tokenizer

    assert clip_tokenizer()(text).input_ids == PUBLISHED_IDS[text]


def test_the_two_sdxl_tokenizers_pad_as_published() -> None:
    """tokenizer (CLIP ViT-L) pads with <|endoftext|> 49407; tokenizer_2 (OpenCLIP bigG) pads
    with "!", id 0, as open_clip's tokenizer fills with zeros."""
    from dropkiln.stages.models.clip_tokenizer import clip_tokenizer

    ids = PUBLISHED_IDS["a photo of a cat"]
    first = clip_tokenizer("endoftext")("a photo of a cat", padding="max_length").input_ids
    second = clip_tokenizer("zero")("a photo of a cat", padding="max_length").input_ids
    assert first == ids + [49407] * (77 - len(ids))
    assert second == ids + [0] * (77 - len(ids))


def test_long_prompts_are_cut_at_77_with_the_end_token_last() -> None:
    from dropkiln.stages.models.clip_tokenizer import clip_tokenizer

    ids = clip_tokenizer()("cat " * 100, truncation=True, padding="max_length").input_ids
    assert len(ids) == 77
    assert ids == [49406] + [2368] * 75 + [49407]


# ---------------------------------------------------------------- detection
def _header_only(path: Path, keys: list[str], metadata: dict[str, str] | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path), metadata=metadata)
    return path


SDXL_KEYS = [
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.ln_final.weight",
    "model.diffusion_model.out.2.weight",
]
SD15_KEYS = [
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    "model.diffusion_model.out.2.weight",
]


@pytest.mark.parametrize(
    ("keys", "metadata", "expected"),
    [
        (SDXL_KEYS, None, ("sdxl", "epsilon", False)),
        (SD15_KEYS, None, ("sd15", "epsilon", False)),
        ([*SDXL_KEYS, "v_pred"], None, ("sdxl", "v_prediction", False)),
        ([*SDXL_KEYS, "v_pred", "ztsnr"], None, ("sdxl", "v_prediction", True)),
        (SD15_KEYS, {"modelspec.prediction_type": "v"}, ("sd15", "v_prediction", False)),
        (SDXL_KEYS, {"modelspec.prediction_type": "epsilon"}, ("sdxl", "epsilon", False)),
    ],
)
def test_family_and_prediction_are_read_from_the_file(
    tmp_path: Path, keys: list[str], metadata: dict[str, str] | None, expected: tuple[Any, ...]
) -> None:
    from dropkiln.stages.models import checkpoint_family

    family = checkpoint_family(_header_only(tmp_path / "m.safetensors", keys, metadata))
    assert (family.kind, family.prediction, family.zero_terminal_snr) == expected


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["cond_stage_model.model.ln_final.weight"], "SD 2.x"),
        (["conditioner.embedders.0.model.ln_final.weight"], "refiner"),
        (["model.diffusion_model.out.2.weight"], "no text encoder"),
        (["lora_unet_down_blocks_0.alpha"], "does not look like"),
    ],
)
def test_other_models_are_refused_by_name(tmp_path: Path, keys: list[str], message: str) -> None:
    path = _header_only(tmp_path / "other.safetensors", keys)
    with pytest.raises(StageError, match=message):
        resolve_model(str(path), tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", b"\xff" * 64]
)
def test_a_damaged_safetensors_file_is_refused_as_such(tmp_path: Path, content: bytes) -> None:
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(content)
    with pytest.raises(StageError, match=r"damaged\.safetensors is not a readable safetensors"):
        resolve_model(str(damaged), tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl"])
def test_pickles_are_still_refused(tmp_path: Path, suffix: str) -> None:
    pickle = tmp_path / f"model{suffix}"
    pickle.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(StageError, match="never loaded"):
        resolve_model(str(pickle), tmp_path)


def test_a_single_file_needs_no_config_folder(tmp_path: Path) -> None:
    ref = resolve_model(str(_header_only(tmp_path / "xl.safetensors", SDXL_KEYS)), tmp_path)
    assert (ref.kind, ref.single_file, ref.config_dir) == ("sdxl", True, SHIPPED_CONFIGS / "sdxl")
    assert not (tmp_path / "configs").exists()


# ---------------------------------------------------------------- c) miniatures
@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network is unavailable in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _state(pipe: Any, name: str) -> dict[str, Any]:
    return {k: v for k, v in getattr(pipe, name).state_dict().items() if "position_ids" not in k}


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_miniature_single_file_renders_like_its_diffusers_twin(
    kind: str, miniatures: dict[str, Any], tmp_path: Path
) -> None:
    import numpy as np
    import torch
    from miniatures import fresh_memory, render

    from dropkiln.stages.models import pipeline_class

    mini = miniatures[kind]
    ref = resolve_model(str(mini.checkpoint), tmp_path, config_root=mini.config_root)
    assert (ref.kind, ref.single_file) == (kind, True)
    single = load_pipeline(ref, "cpu", torch.float32)
    no_checker = {"safety_checker": None} if kind == "sd15" else {}
    twin = pipeline_class(kind).from_pretrained(str(mini.twin), local_files_only=True, **no_checker)
    twin.set_progress_bar_config(disable=True)
    for name in COMPONENTS[kind]:
        ours, theirs = _state(single, name), _state(twin, name)
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{name}.{key}"
    image = render(fresh_memory(single))
    assert image.std() > 0.01  # a real picture, not a flat field
    np.testing.assert_array_equal(image, render(fresh_memory(twin)))
    assert dict(single.scheduler.config) == dict(twin.scheduler.config)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
@pytest.mark.parametrize("variant", [[], ["v_pred"], ["v_pred", "ztsnr"]])
def test_prediction_markers_reach_the_scheduler(
    kind: str, variant: list[str], tmp_path: Path
) -> None:
    """The scheduler handed to from_single_file (which uses a passed component as is)."""
    from dropkiln.stages.models.loading import single_file_parts

    keys = SDXL_KEYS if kind == "sdxl" else SD15_KEYS
    ref = resolve_model(str(_header_only(tmp_path / "m.safetensors", keys + variant)), tmp_path)
    parts = single_file_parts(ref)
    config = parts["scheduler"].config
    assert config.prediction_type == ("v_prediction" if variant else "epsilon")
    zero_snr = "ztsnr" in variant
    assert ref.zero_terminal_snr is zero_snr
    assert (config.timestep_spacing == "trailing") is zero_snr
    # SD 1.5 ships PNDM, which has no rescale option; the prompt's scheduler is built from
    # this v-prediction config with the rescale on (schedulers.needs_zero_snr).
    assert config.get("rescale_betas_zero_snr", False) is (zero_snr and kind == "sdxl")
    assert ("tokenizer_2" in parts) is (kind == "sdxl")


def test_a_v_prediction_file_is_not_trained_as_epsilon(tmp_path: Path) -> None:
    from dropkiln.config import TrainSettings
    from dropkiln.stages.train import check_prediction

    marked = _header_only(tmp_path / "noob.safetensors", [*SDXL_KEYS, "v_pred"])
    ref = resolve_model(str(marked), tmp_path)
    with pytest.raises(
        StageError, match=r'noob\.safetensors.* set prediction_type = "v_prediction"'
    ):
        check_prediction(ref, TrainSettings())
    check_prediction(ref, TrainSettings(prediction_type="v_prediction"))
    plain = resolve_model(str(_header_only(tmp_path / "xl.safetensors", SDXL_KEYS)), tmp_path)
    check_prediction(plain, TrainSettings())
