"""Reference images (IP-Adapter) against diffusers' own IP-Adapter path, on a tiny image
encoder and adapter built locally from a fixed seed; and the prompt-file checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_generate import gen_root, local, one_thread, pixels, spec_for

from dropkiln.options import GenerateSettings
from dropkiln.stages.base import StageError
from dropkiln.stages.generate import run_generate
from dropkiln.stages.generation.prompt_loading import load_prompt_file
from dropkiln.stages.generation.references import ADAPTER_FILE, ensure_tiny_adapter

torch = pytest.importorskip("torch")

__all__ = ["gen_root", "one_thread"]  # test_generate's fixtures

TWO_REFERENCES = """\
[defaults]
steps = 3
width = 64
height = 64
seed = 7
[[image]]
prompt = "a knight"
reference = [
  { image = "character.png", weight = 0.9 },
  { image = "style.png", weight = 0.4 },
]
[[image]]
prompt = "a knight"
reference = { image = "character.png", weight = 0.9 }
[[image]]
prompt = "a knight"
"""


def write_references(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(5)
    character = np.zeros((48, 48, 3), np.uint8)
    character[8:40, 16:32] = (230, 40, 40)
    Image.fromarray(character).save(folder / "character.png")
    style = generator.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(style).save(folder / "style.png")


def diffusers_with_adapter(models_dir: Path, adapter: Path, count: int) -> object:
    """A freshly loaded pipeline with the adapter loaded by diffusers from its folder."""
    from dropkiln.stages.models import load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model("tiny-sdxl", models_dir), "cpu", torch.float32)
    pipe.load_ip_adapter(
        str(adapter),
        subfolder="",
        weight_name=[ADAPTER_FILE] * count,
        image_encoder_folder="image_encoder",
        local_files_only=True,
    )
    return pipe


def test_references_equal_diffusers_ip_adapter_and_steer_the_image(
    gen_root: Path, models_dir: Path, tmp_path: Path
) -> None:
    from dropkiln.stages.models import resolve_model

    folder = tmp_path / "drop"
    write_references(folder)
    (folder / "p.toml").write_text(TWO_REFERENCES)
    prompt_file = load_prompt_file(folder / "p.toml", GenerateSettings())
    result = run_generate(spec_for(tmp_path / "out", prompt_file), local(gen_root, tmp_path))
    two, one, plain = (pixels(path) for path in result["images"])

    adapter = ensure_tiny_adapter(resolve_model("tiny-sdxl", models_dir), models_dir)
    with Image.open(folder / "character.png") as img:
        character = img.convert("RGB")
    with Image.open(folder / "style.png") as img:
        style = img.convert("RGB")
    call = {"prompt": "a knight", "num_inference_steps": 3, "guidance_scale": 5.0,
            "width": 64, "height": 64}  # fmt: skip

    pipe = diffusers_with_adapter(models_dir, adapter, 2)
    pipe.set_ip_adapter_scale([0.9, 0.4])
    expected = pipe(
        ip_adapter_image=[character, style], generator=torch.Generator().manual_seed(7), **call
    ).images[0]
    assert np.array_equal(two, np.asarray(expected))

    pipe = diffusers_with_adapter(models_dir, adapter, 1)
    pipe.set_ip_adapter_scale(0.9)
    expected = pipe(
        ip_adapter_image=character, generator=torch.Generator().manual_seed(7), **call
    ).images[0]
    assert np.array_equal(one, np.asarray(expected))

    # the same seed and prompt: only the references differ
    assert np.abs(one.astype(int) - plain.astype(int)).mean() > 1
    assert np.abs(two.astype(int) - one.astype(int)).mean() > 1


def test_the_warm_pipeline_is_left_without_the_adapter(gen_root: Path, tmp_path: Path) -> None:
    from dropkiln.stages.models import resolve_model, shared_pipelines

    folder = tmp_path / "drop"
    write_references(folder)
    (folder / "p.toml").write_text(TWO_REFERENCES)
    prompt_file = load_prompt_file(folder / "p.toml", GenerateSettings())
    run_generate(spec_for(tmp_path / "out", prompt_file), local(gen_root, tmp_path))
    pipe = shared_pipelines().get(
        resolve_model("tiny-sdxl", gen_root / "state" / "models"), "cpu", torch.float32
    )
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert pipe.unet.encoder_hid_proj is None
    kinds = {type(processor).__name__ for processor in pipe.unet.attn_processors.values()}
    assert not any("IPAdapter" in kind for kind in kinds)


def load_error(folder: Path, text: str) -> str:
    write_references(folder)
    (folder / "p.toml").write_text(text)
    with pytest.raises(StageError) as caught:
        load_prompt_file(folder / "p.toml", GenerateSettings())
    return str(caught.value)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ('{ image = "missing.png" }', "p.toml: image[0].reference.image: 'missing.png' does not"),
        ('{ image = "../x.png" }', "image[0].reference.image: '../x.png' leaves the prompt file"),
        (
            '{ image = "character.png", weight = 3 }',
            "image[0].reference[0].weight: Input should be less than or equal to 2",
        ),
        ('{ image = "character.png", scale = 1 }', "image[0].reference[0].scale: unknown key"),
        (
            '[{ image = "character.png" }, { image = "style.png", adapter = "b.safetensors" }]',
            "image[0].reference: every reference of an entry must name the same adapter",
        ),
        ("[]", "image[0].reference"),
    ],
)
def test_bad_references_are_rejected_naming_the_entry_and_field(
    tmp_path: Path, reference: str, expected: str
) -> None:
    text = f'[[image]]\nprompt = "a"\nreference = {reference}\n'
    assert expected in load_error(tmp_path, text)


def test_references_are_refused_in_a_latent_walk(tmp_path: Path) -> None:
    text = (
        '[video]\nkind = "latent-walk"\n[[image]]\nprompt = "a"\ncount = 2\n'
        'reference = { image = "character.png" }\n'
    )
    message = load_error(tmp_path, text)
    assert "image[0].reference: not supported with a latent-walk video" in message


def test_an_adapter_file_without_its_image_encoder_fails_clearly(
    gen_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    write_references(folder)
    lone = tmp_path / "adapters" / "ip-adapter_sdxl.safetensors"
    lone.parent.mkdir()
    lone.write_bytes(b"not used")
    (folder / "p.toml").write_text(
        f'[[image]]\nprompt = "a"\nwidth = 64\nheight = 64\nsteps = 1\n'
        f'reference = {{ image = "character.png", adapter = "{lone}" }}\n'
    )
    prompt_file = load_prompt_file(folder / "p.toml", GenerateSettings())
    with pytest.raises(StageError, match="no image encoder"):
        run_generate(spec_for(tmp_path / "out", prompt_file), local(gen_root, tmp_path))
