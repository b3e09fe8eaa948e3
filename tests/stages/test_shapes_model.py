"""tiny-shapes: the shipped weights, the pixel detector, prompt following, and the training
script that made the weights."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dropkiln.stages.models.shapes_detect import detect
from dropkiln.stages.models.shapes_model import SHAPES_WEIGHTS
from dropkiln.stages.models.shapes_scenes import (
    all_combinations,
    draw_scene,
    is_held_out,
    random_scene,
    scene_caption,
)

SHIPPED_SHA256 = "940a30a917db429866d613d51e2b425e24552bfaf85ec1b96e31e0968fd41b2b"
"""The weights file the documented run wrote (README: "Retraining tiny-shapes")."""

HELD_OUT_PROMPTS = 40
# The goal of issue 17. The shipped weights (1500 UNet steps) measured colour 0.225,
# position 0.25, shape 0.225 on these 40 prompts (20 Euler steps, guidance 5, seeds 0..39):
# barely above chance, so the test is a strict xfail until a longer training run meets it.
MIN_COLOUR = 0.9
MIN_POSITION = 0.7
MIN_SHAPE = 0.7


def test_shipped_weights_are_the_pinned_file() -> None:
    digest = hashlib.sha256(SHAPES_WEIGHTS.read_bytes()).hexdigest()
    assert digest == SHIPPED_SHA256
    assert SHAPES_WEIGHTS.stat().st_size <= 20 * 1024 * 1024


def test_detector_reads_drawn_scenes() -> None:
    # The detector is the judge of prompt following, so it must read clean scenes perfectly.
    rng = np.random.Generator(np.random.PCG64(11))
    wrong: Counter[str] = Counter()
    for number in range(240):
        scene = random_scene(rng, held_out=number % 2 == 0)
        found = detect(draw_scene(scene))
        wrong.update(
            name
            for name, ok in (
                ("colour", found.colour == scene.colour),
                ("position", found.position == scene.position),
                ("shape", found.shape == scene.shape),
            )
            if not ok
        )
    assert not wrong, wrong


def test_held_out_prompts_never_reach_training() -> None:
    rng = np.random.Generator(np.random.PCG64(2))
    trained = {random_scene(rng).caption for _ in range(3000)}
    held = {scene_caption(sz, c, sh, bg, pos) for sh, c, bg, sz, pos in _held_out()}
    assert held and not trained & held
    assert 0.08 < len(held) / len(all_combinations()) < 0.18


@pytest.mark.slow
def test_tiny_shapes_loads_like_any_built_in(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = _pipeline(tmp_path)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    # its own tokenizer: the scene words' merges on top of the common ones, and an encoder
    # embedding for every token of it
    ids = pipe.tokenizer("a red triangle").input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red triangle"
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert len(pipe.tokenizer) > len(_tiny_sdxl_tokenizer(tmp_path))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="tiny-shapes is undertrained: colour 0.225, shape 0.225")
def test_tiny_shapes_follows_held_out_prompts(tmp_path: Path) -> None:
    import torch

    pipe = _pipeline(tmp_path)
    held = _held_out()
    picks = np.random.Generator(np.random.PCG64(0)).choice(len(held), HELD_OUT_PROMPTS, False)
    right: Counter[str] = Counter()
    for seed, pick in enumerate(picks):
        shape, colour, background, size, position = held[pick]
        image = pipe(
            prompt=scene_caption(size, colour, shape, background, position),
            num_inference_steps=20,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        found = detect(image)
        right.update(
            colour=found.colour == colour, position=found.position == position,
            shape=found.shape == shape,
        )  # fmt: skip
    accuracy = {name: right[name] / HELD_OUT_PROMPTS for name in ("colour", "position", "shape")}
    print(f"prompt following on {HELD_OUT_PROMPTS} held-out prompts: {accuracy}")
    assert accuracy["colour"] >= MIN_COLOUR, accuracy
    assert accuracy["position"] >= MIN_POSITION, accuracy
    assert accuracy["shape"] >= MIN_SHAPE, accuracy


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="tiny-shapes' VAE gives back colour 0.15, shape 0.30")
def test_tiny_shapes_vae_gives_back_what_prompts_name() -> None:
    # The UNet draws through the VAE's decoder: a colour or shape the decoder cannot give
    # back caps prompt following however long the UNet trains. The shipped VAE measured
    # colour 0.15, position 0.60, shape 0.30 on 40 held-out scenes (it turns every shape
    # one or two colours per background) and no purple star (the demo's concept) of 40;
    # the goal needs it near perfect.
    from dropkiln.stages.models.shapes_detect import vae_readback
    from dropkiln.stages.models.shapes_model import shapes_components

    readback = vae_readback(shapes_components()["vae"])
    print(f"VAE read-back on 40 held-out scenes: {readback}")
    _assert_vae_gives_back(readback)


@pytest.mark.slow
@pytest.mark.full
def test_recipe_vae_gives_back_what_prompts_name() -> None:
    # The recipe's first phase alone (the VAE every run starts the UNet from), on the
    # scenes and the purple stars it never saw. Its old form (L1 on sampled latents, named
    # colours only, four norm groups) read back colour 0.15 / 0.43, purple never.
    from dropkiln.stages.models.shapes_detect import vae_readback
    from dropkiln.stages.models.train_tiny import Recipe, train_vae

    readback = vae_readback(train_vae(Recipe()))
    print(f"the recipe's VAE reads back: {readback}")
    _assert_vae_gives_back(readback)


def test_reconstruction_error_pins_the_shape_colour() -> None:
    # A decoder that gets every background pixel right and turns a small red square
    # orange is almost right per pixel; the colour term sees the whole shape go wrong.
    import torch

    from dropkiln.stages.models.shapes_scenes import Scene
    from dropkiln.stages.models.train_tiny import reconstruction_errors

    red = Scene("square", "red", "white", "small", "center", (220, 30, 30))
    orange = Scene("square", "orange", "white", "small", "center", (240, 130, 20))
    drawn, shifted = (
        torch.from_numpy(np.asarray(draw_scene(s), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5
        - 1
        for s in (red, orange)
    )
    error, colour = reconstruction_errors(shifted, drawn, shape_weight=8.0)
    plain = (shifted - drawn).abs().mean()
    assert colour > 4 * plain
    assert error > 4 * plain  # the shape's pixels weigh 9 times the background's
    assert reconstruction_errors(drawn, drawn, shape_weight=8.0)[1] == 0


def _assert_vae_gives_back(readback: dict[str, float]) -> None:
    assert readback["colour"] >= 0.95, readback
    assert readback["position"] >= 0.95, readback
    assert readback["shape"] >= 0.9, readback
    assert readback["concept"] >= 0.9, readback


@pytest.mark.slow
def test_training_script_is_deterministic(tmp_path: Path) -> None:
    # The documented command, shortened, run twice in separate processes: the same recipe
    # must give the same bytes (what makes the shipped file reproducible).
    short = ["--vae-steps", "3", "--vae-batch", "4", "--scenes", "64"]
    short += ["--unet-steps", "3", "--unet-batch", "4"]
    runs = [short, short]
    digests = []
    for number, flags in enumerate(runs):
        target = tmp_path / f"{number}.safetensors"
        command = [sys.executable, "-m", "dropkiln.stages.models.train_tiny", "--out", str(target)]
        subprocess.run([*command, *flags], check=True, capture_output=True, timeout=600)
        digests.append(hashlib.sha256(target.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.full
def test_documented_run_reproduces_the_shipped_weights(tmp_path: Path) -> None:
    from dropkiln.stages.models.train_tiny import main

    target = tmp_path / "tiny-shapes.safetensors"
    assert main(["--out", str(target)]) == 0
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHIPPED_SHA256


def _tiny_sdxl_tokenizer(tmp_path: Path) -> object:
    from transformers import CLIPTokenizer

    from dropkiln.stages.models.tokenizer import write_tokenizer

    write_tokenizer(tmp_path / "sdxl-tokenizer")
    return CLIPTokenizer.from_pretrained(str(tmp_path / "sdxl-tokenizer"))


def _held_out() -> list[tuple[str, str, str, str, str]]:
    return [combo for combo in all_combinations() if is_held_out(*combo)]


def _pipeline(tmp_path: Path) -> object:
    import torch

    from dropkiln.stages.models import load_pipeline, resolve_model

    ref = resolve_model("tiny-shapes", tmp_path / "models")
    assert ref.kind == "sdxl"
    return load_pipeline(ref, "cpu", torch.float32)
