"""tiny-shapes: the shipped weights, the pixel detector, prompt following, and the training
script that made the weights."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dropkiln.stages.models.shapes_detect import detect
from dropkiln.stages.models.shapes_eval import PROMPTS as HELD_OUT_PROMPTS
from dropkiln.stages.models.shapes_eval import prompt_following as measure_prompt_following
from dropkiln.stages.models.shapes_model import SHAPES_WEIGHTS
from dropkiln.stages.models.shapes_scenes import (
    all_combinations,
    draw_scene,
    is_held_out,
    random_scene,
    scene_caption,
)

SHIPPED_SHA256 = "08c75b9c8f8bc549a68bc05e9c36967300ca0b901d804f589ead5c230744ab36"
"""The weights file the documented run wrote (README: "Retraining tiny-shapes")."""

GOAL = {"colour": 0.9, "position": 0.7, "shape": 0.7}
"""Issue 17's goal for prompt following on the held-out prompts."""
MEASURED = {"colour": 0.95, "position": 1.0, "shape": 0.75}
"""What the shipped weights measured on these 40 prompts (20 Euler steps, guidance 5, seeds
0..39); the floor test allows two prompts less per attribute, for other CPUs' kernels. The
weights before them (the same recipe trained with seed 1 on one thread; sha256 0aa447e5...)
measured colour 1.0, position 1.0, shape 0.725; those before (VAE 3000 steps; sha256
d896570e...) 1.0 / 0.975 / 0.60; those before (VAE 1000 steps, UNet 1500, no footprint
weight; sha256 6333516c...) 0.925 / 0.95 / 0.40; those before that (commit 1cba31c) 0.225 /
0.25 / 0.225."""
VAE_GOAL = {"colour": 0.95, "position": 0.95, "shape": 0.9, "concept": 0.9}
VAE_MEASURED = {"colour": 1.0, "position": 0.95, "shape": 0.825, "concept": 0.4}
"""The shipped VAE's read-back of 40 held-out scenes and of 40 purple stars (the demo's
first concept). It still blurs edges a little: colours and places come back, a sixth of the
shapes come back rounder than drawn (stars as blobs), and three purple stars in five come back
as something else. The seed-1 one-thread VAE before it read back 1.0 / 1.0 / 0.825 / 0.4; the
one before that (3000 steps) 1.0 / 0.9 / 0.675 / 0.25; the one before that (1000 steps)
0.95 / 0.9 / 0.475 / 0.025; the one before that 0.15 / 0.60 / 0.30 / none."""
MARGIN = 2 / HELD_OUT_PROMPTS


def test_shipped_weights_are_the_pinned_file() -> None:
    digest = hashlib.sha256(SHAPES_WEIGHTS.read_bytes()).hexdigest()
    assert digest == SHIPPED_SHA256
    assert SHAPES_WEIGHTS.stat().st_size <= 20 * 1024 * 1024


def test_shipped_weights_name_the_default_recipe() -> None:
    # The documented run writes the recipe into the file; a knob added to the recipe (the
    # decoder phase, off by default) must not change what the default run writes.
    import json

    from safetensors import safe_open

    from dropkiln.stages.models.train_tiny import Recipe

    with safe_open(str(SHAPES_WEIGHTS), "pt") as weights:
        named = json.loads(weights.metadata()["dropkiln.recipe"])
    assert named == Recipe().recorded()
    assert "decoder_steps" in replace(Recipe(), decoder_steps=1).recorded()


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


@pytest.fixture(scope="module")
def prompt_following(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    # through the path a user's job takes (resolve, load), the first set of the figures
    # `python -m dropkiln.stages.models.shapes_eval` prints
    accuracy = measure_prompt_following(_pipeline(tmp_path_factory.mktemp("shapes")))
    print(f"prompt following on {HELD_OUT_PROMPTS} held-out prompts: {accuracy}")
    return accuracy


@pytest.mark.slow
def test_tiny_shapes_follows_held_out_prompts_as_measured(
    prompt_following: dict[str, float],
) -> None:
    for name, measured in MEASURED.items():
        assert prompt_following[name] >= measured - MARGIN, (name, prompt_following)


@pytest.mark.slow
def test_tiny_shapes_colour_and_position_meet_the_goal(prompt_following: dict[str, float]) -> None:
    for name in ("colour", "position"):
        assert prompt_following[name] >= GOAL[name], (name, prompt_following)


@pytest.mark.slow
def test_tiny_shapes_shape_meets_the_goal(prompt_following: dict[str, float]) -> None:
    assert prompt_following["shape"] >= GOAL["shape"], prompt_following


@pytest.fixture(scope="module")
def shipped_readback() -> dict[str, float]:
    from dropkiln.stages.models.shapes_detect import vae_readback
    from dropkiln.stages.models.shapes_model import shapes_components

    readback = vae_readback(shapes_components()["vae"])
    print(f"VAE read-back on 40 held-out scenes and 40 purple stars: {readback}")
    return readback


@pytest.mark.slow
def test_tiny_shapes_vae_gives_back_as_measured(shipped_readback: dict[str, float]) -> None:
    for name, measured in VAE_MEASURED.items():
        assert shipped_readback[name] >= measured - MARGIN, (name, shipped_readback)


@pytest.mark.slow
def test_eval_script_prints_the_read_back_of_the_file_it_is_given(
    capsys: pytest.CaptureFixture[str], shipped_readback: dict[str, float]
) -> None:
    # The README's figures for a retrained file come from this command; on the shipped file
    # it must print what the product's own load path reads back.
    from dropkiln.stages.models.shapes_eval import main

    assert main([str(SHAPES_WEIGHTS), "--sets", "0"]) == 0
    printed = capsys.readouterr().out
    expected = ", ".join(f"{k} {v:.1%}" for k, v in shipped_readback.items())
    assert f"VAE read-back: {expected}" in printed, printed


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="tiny-shapes' VAE gives purple stars back: 0.4")
def test_tiny_shapes_vae_gives_back_what_prompts_name(shipped_readback: dict[str, float]) -> None:
    # The UNet draws through the VAE's decoder: a colour or shape the decoder cannot give
    # back caps prompt following however long the UNet trains.
    _assert_vae_gives_back(shipped_readback)


def _assert_vae_gives_back(readback: dict[str, float]) -> None:
    for name, goal in VAE_GOAL.items():
        assert readback[name] >= goal, (name, readback)


@pytest.mark.slow
@pytest.mark.full
def test_recipe_vae_reads_back_as_the_shipped_vae() -> None:
    # The recipe's first phase alone (the VAE every run starts the UNet from), on the scenes
    # and the purple stars it never saw: it must give back what the shipped VAE does.
    from dropkiln.stages.models.shapes_detect import vae_readback
    from dropkiln.stages.models.train_tiny import Recipe, train_vae

    readback = vae_readback(train_vae(Recipe()))
    print(f"the recipe's VAE reads back: {readback}")
    for name, measured in VAE_MEASURED.items():
        assert readback[name] >= measured - MARGIN, (name, readback)


def test_reconstruction_error_pins_the_shape_colour() -> None:
    # A decoder that gets every background pixel right and turns a small red square
    # orange is almost right per pixel; the colour term sees the whole shape go wrong.
    import torch

    from dropkiln.stages.models.shapes_scenes import Scene
    from dropkiln.stages.models.shapes_vae import reconstruction_errors

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


def test_margin_makes_a_blob_cost_what_a_shrunken_shape_does() -> None:
    # Weighted toward the shape alone, a reconstruction that spills the shape's colour a
    # pixel past its edge (a star's gaps filled: a blob) costs far less than one that falls
    # a pixel short of it; with the margin weighed as the shape, the two cost about alike.
    import torch

    from dropkiln.stages.models.shapes_scenes import Scene
    from dropkiln.stages.models.shapes_vae import reconstruction_errors

    def pixels(scale: float) -> torch.Tensor:
        scene = Scene("square", "red", "white", "large", "center", (220, 30, 30), scale=scale)
        array = np.asarray(draw_scene(scene), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1

    drawn, spilled, shrunk = pixels(1.0), pixels(32 / 28), pixels(24 / 28)

    def cost(reconstruction: torch.Tensor, margin: int) -> float:
        return float(reconstruction_errors(reconstruction, drawn, 8.0, margin=margin)[0])

    assert cost(spilled, 0) < 0.4 * cost(shrunk, 0)
    assert 0.7 < cost(spilled, 2) / cost(shrunk, 2) < 1.5


@pytest.mark.slow
def test_decoder_phase_changes_only_the_decoder() -> None:
    # The decoder phase draws its own scenes and leaves the encoder frozen, so every other
    # tensor (the latents the UNet learns, the text encoders, the UNet) is bit for bit what
    # the recipe without it gives.
    import torch

    from dropkiln.stages.models.train_tiny import Recipe, train

    short = Recipe(
        vae_steps=2, vae_batch=2, text_steps=2, text_batch=2, scenes=8, unet_steps=2,
        unet_batch=2, decoder_steps=0,
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        without = train(short, log=io.StringIO())
        sharpened = train(replace(short, decoder_steps=2), log=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    decoder = ("vae.decoder.", "vae.post_quant_conv.")
    assert without.keys() == sharpened.keys()
    changed = {k for k in without if not torch.equal(without[k], sharpened[k])}
    assert changed and all(k.startswith(decoder) for k in changed), sorted(changed)[:5]


@pytest.mark.slow
def test_training_script_is_deterministic(tmp_path: Path) -> None:
    # The documented command, shortened, run twice in separate processes (all three phases):
    # the same recipe must give the same bytes, which is what makes the shipped file
    # reproducible; and writing checkpoints on the way (the EMA weights swapped in and out)
    # must not change the final file.
    short = ["--vae-steps", "3", "--vae-batch", "4", "--text-steps", "3", "--text-batch", "4"]
    short += ["--scenes", "64", "--unet-steps", "4", "--unet-batch", "4"]
    runs = [short, [*short, "--checkpoint-every", "2"]]
    digests = []
    for number, flags in enumerate(runs):
        target = tmp_path / f"{number}.safetensors"
        command = [sys.executable, "-m", "dropkiln.stages.models.train_tiny", "--out", str(target)]
        subprocess.run([*command, *flags], check=True, capture_output=True, timeout=600)
        digests.append(hashlib.sha256(target.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert (tmp_path / "1-step2.safetensors").is_file()
    assert not (tmp_path / "0-step2.safetensors").exists()


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


def test_unet_footprint_covers_the_shape_and_one_latent_pixel_around_it() -> None:
    # The UNet's loss can weigh the shape's latent pixels above the background's: the mask
    # comes from the drawn scene, on the VAE's 4x-downsampled grid, grown by one latent pixel
    # (the decoder reads an edge from its neighbours too).
    import torch

    from dropkiln.stages.models.shapes_scenes import Scene
    from dropkiln.stages.models.train_tiny import latent_footprint

    scene = Scene("square", "red", "white", "small", "top left", (220, 30, 30))
    array = np.asarray(draw_scene(scene), dtype=np.float32)
    image = torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
    blank = torch.full_like(image, 245 / 127.5 - 1)
    footprint = latent_footprint(torch.cat([image, blank]), 16)
    assert footprint.shape == (2, 1, 16, 16)
    assert footprint[1].sum() == 0
    # the 4x4 pixel blocks the square touches, then every block next to one of them
    touched = (np.abs(array - 245).max(axis=2) > 12).reshape(16, 4, 16, 4).any(axis=(1, 3))
    rows, cols = np.nonzero(touched)
    expected = torch.zeros(16, 16)
    expected[rows.min() - 1 : rows.max() + 2, cols.min() - 1 : cols.max() + 2] = 1
    assert 4 <= rows.max() - rows.min() + 1 <= 6
    assert torch.equal(footprint[0, 0], expected)
