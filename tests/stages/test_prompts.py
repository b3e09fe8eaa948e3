"""Prompt files: parsing, defaults, validation messages, expansion into images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dropkiln.config import Settings
from dropkiln.stages.base import StageError
from dropkiln.stages.prompts import (
    ImageEntry,
    LoraRef,
    PromptFile,
    expand_jobs,
    load_prompt_file,
)

FULL_TOML = """\
model = "tiny-sdxl"
loras = [{ name = "cats", weight = 0.8 }, "dogs"]

[defaults]
steps = 4
guidance = 3.5
width = 64
height = 64
scheduler = "dpm++ 2m karras"
seed = 10

[[image]]
prompt = "a cat in a spacesuit"
negative = "blurry"
count = 2
name = "cat"

[[image]]
prompt = "a dog"
seed = 99
width = 128
clip_skip = 2

[video]
kind = "slideshow"
fps = 12
seconds_per_image = 1.5
transition = "crossfade"
"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(root=tmp_path)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load_error(folder: Path, settings: Settings, name: str, text: str) -> str:
    with pytest.raises(StageError) as caught:
        load_prompt_file(write(folder, name, text), settings)
    message = str(caught.value)
    assert len(message.splitlines()) <= 2
    assert message.startswith(f"{name}: ")
    return message


def test_toml_fields_defaults_and_overrides(tmp_path: Path, settings: Settings) -> None:
    prompt_file = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings)
    assert prompt_file.model == "tiny-sdxl"
    assert prompt_file.loras == [LoraRef(name="cats", weight=0.8), LoraRef(name="dogs")]
    cat, dog = prompt_file.images
    assert (cat.steps, cat.guidance, cat.scheduler, cat.seed, cat.count) == (
        4,
        3.5,
        "dpm++ 2m karras",
        10,
        2,
    )
    assert (cat.negative, cat.name, cat.width, cat.clip_skip) == ("blurry", "cat", 64, None)
    assert (dog.seed, dog.width, dog.height, dog.clip_skip, dog.count) == (99, 128, 64, 2, 1)
    assert prompt_file.video is not None
    assert prompt_file.video.seconds_per_image == 1.5


def test_a_prompt_file_names_a_vae(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "p.toml"
    path.write_text('vae = "/vaes/sdxl_vae.safetensors"\n[[image]]\nprompt = "x"\n')
    assert load_prompt_file(path, settings).vae == "/vaes/sdxl_vae.safetensors"
    path.write_text('vae = ""\n[[image]]\nprompt = "x"\n')
    with pytest.raises(StageError, match="vae"):
        load_prompt_file(path, settings)


def test_json_has_the_same_shape(tmp_path: Path, settings: Settings) -> None:
    import tomllib

    data = tomllib.loads(FULL_TOML)
    from_json = load_prompt_file(write(tmp_path, "p.json", json.dumps(data)), settings)
    from_toml = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings)
    assert from_json == from_toml


def test_txt_one_prompt_a_line_with_settings_defaults(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    settings.generate.steps = 7
    settings.generate.width = 256
    text = "# a comment\n\na red fox\n   \n  a blue bird  \n# another\n"
    prompt_file = load_prompt_file(write(tmp_path, "p.txt", text), settings)
    assert [image.prompt for image in prompt_file.images] == ["a red fox", "a blue bird"]
    assert {(image.steps, image.width) for image in prompt_file.images} == {(7, 256)}
    assert prompt_file.model is None and prompt_file.video is None


def test_file_defaults_override_settings(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    settings.generate.guidance = 9.0
    text = '[defaults]\nsteps = 3\n[[image]]\nprompt = "x"\n'
    (image,) = load_prompt_file(write(tmp_path, "p.toml", text), settings).images
    assert (image.steps, image.guidance) == (3, 9.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[image]]\nprompt = "a"\n[[image]]\nprompt = "b"\nstpes = 3\n', "image[1].stpes:"),
        ('[[image]]\nprompt = "a"\nsteps = "20"\n', "image[0].steps:"),
        ('[[image]]\nprompt = "a"\nwidth = 100\n', "image[0].width: must be a multiple of 8"),
        ('[[image]]\nprompt = "a"\nwidth = 8192\nheight = 8192\n', "over max_pixels"),
        ('[[image]]\nprompt = "a"\nscheduler = "heun"\n', "image[0].scheduler: unknown scheduler"),
        ('[[image]]\nprompt = "a"\nname = "../up"\n', "image[0].name:"),
        ('[[image]]\nprompt = "a"\nname = "/etc/x"\n', "image[0].name:"),
        ('[[image]]\nprompt = "a"\nname = "a/b"\n', "image[0].name:"),
        ('[[image]]\nprompt = "a"\nname = "a\\\\b"\n', "image[0].name:"),
        ('[[image]]\nprompt = "a"\nname = ".."\n', "image[0].name:"),
        ('[[image]]\nprompt = "a"\ncount = 100000\n', "image[0].count:"),
        ('[[image]]\nprompt = "a"\nsteps = 5000\n', "image[0].steps:"),
        ('[[image]]\nprompt = "a"\nseed = -1\n', "image[0].seed:"),
        (f'[[image]]\nprompt = "a"\nseed = {2**63 - 1}\ncount = 2\n', "runs past"),
        ('images = [{ prompt = "a" }]\n', "images: unknown key (did you mean 'image'?)"),
        ('image = ["a"]\n', "image[0]: Input should be a valid dictionary"),
        ('[[image]]\nnegative = "a"\n', "image[0].prompt: Field required"),
        ('[defaults]\nstep = 3\n[[image]]\nprompt = "a"\n', "defaults.step: unknown key"),
        ('modle = "x"\n[[image]]\nprompt = "a"\n', "modle: unknown key (did you mean 'model'?)"),
        ('loras = [{ name = "a", weight = "x" }]\n[[image]]\nprompt = "a"\n', "loras[0].weight"),
        ('[video]\nkind = "zoom"\n[[image]]\nprompt = "a"\n', "video.kind:"),
        ('[video]\nformat = "avi"\n[[image]]\nprompt = "a"\n', "video.format:"),
        ('[video]\nkind = "latent-walk"\n[[image]]\nprompt = "a"\n', "at least two images"),
        ("model = \n", "not valid TOML"),
        ('model = "x"\n', "no [[image]] entries"),
        ('[[image]]\nprompt = "a"\nwidth = 64\n[[image]]\nprompt = "b"\n'
         '[video]\nkind = "latent-walk"\n', "image[1].width: a latent walk needs one size"),
    ],
)  # fmt: skip
def test_invalid_files_name_the_entry_and_field(
    tmp_path: Path, settings: Settings, text: str, expected: str
) -> None:
    assert expected in load_error(tmp_path, settings, "bad.toml", text)


def test_many_count_images_in_all_is_refused(tmp_path: Path, settings: Settings) -> None:
    entries = '[[image]]\nprompt = "a"\ncount = 1000\n' * 11
    assert "at most 10,000" in load_error(tmp_path, settings, "many.toml", entries)


def test_bad_json_and_wrong_top_level(tmp_path: Path, settings: Settings) -> None:
    assert "not valid JSON" in load_error(tmp_path, settings, "x.json", "{")
    assert "top level" in load_error(tmp_path, settings, "y.json", "[1, 2]")
    assert "no prompts" in load_error(tmp_path, settings, "z.txt", "# only a comment\n")


def test_unknown_setting_default_names_the_settings(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    settings.generate.scheduler = "lms"
    message = load_error(tmp_path, settings, "p.txt", "a fox\n")
    assert "p.txt: dropkiln.toml: generate.scheduler: unknown scheduler 'lms'" in message


def test_control_image_is_resolved_beside_the_prompt_file(
    tmp_path: Path, settings: Settings
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "pose.png")
    text = '[[image]]\nprompt = "a"\ncontrol = { image = "pose.png", scale = 0.5 }\n'
    (image,) = load_prompt_file(write(folder, "p.toml", text), settings).images
    assert image.control is not None
    assert image.control.image == str((folder / "pose.png").resolve())
    assert (image.control.model, image.control.scale) == ("tiny", 0.5)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("missing.png", "does not exist"),
        ("../outside.png", "leaves the prompt file's folder"),
        ("/tmp/abs.png", "must be relative"),
        ("garbage.png", "not a readable image"),
    ],
)
def test_bad_control_images(tmp_path: Path, settings: Settings, image: str, expected: str) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder / "garbage.png").write_bytes(b"not a png at all")
    text = f'[[image]]\nprompt = "a"\n[[image]]\nprompt = "b"\ncontrol = {{ image = "{image}" }}\n'
    message = load_error(folder, settings, "p.toml", text)
    assert "image[1].control.image" in message and expected in message


def test_expand_jobs_gives_consecutive_seeds_and_stems(tmp_path: Path, settings: Settings) -> None:
    prompt_file = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings)
    tasks = expand_jobs(prompt_file)
    assert [(t.index, t.entry, t.seed, t.stem) for t in tasks] == [
        (0, 0, 10, "000-10-cat"),
        (1, 0, 11, "001-11-cat"),
        (2, 1, 99, "002-99"),
    ]
    assert tasks[2].width == 128 and tasks[0].negative == "blurry"


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 2**40)), min_size=1, max_size=6))
def test_expansion_counts_and_unique_stems(entries: list[tuple[int, int]]) -> None:
    images = [
        ImageEntry(prompt=f"p{i}", count=count, seed=seed, width=64, height=64)
        for i, (count, seed) in enumerate(entries)
    ]
    tasks = expand_jobs(PromptFile(images=images))
    assert len(tasks) == sum(count for count, _ in entries)
    assert len({t.stem for t in tasks}) == len(tasks)
    assert [t.index for t in tasks] == list(range(len(tasks)))


def test_specs_survive_json_and_stage_modules_import_without_torch(
    tmp_path: Path, settings: Settings
) -> None:
    import subprocess
    import sys

    from dropkiln.stages.generate import GenerateSpec, LoraFile
    from dropkiln.stages.video import VideoSpec

    prompt_file = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings)
    spec = GenerateSpec(name="p", model="tiny-sdxl", prompt_file=prompt_file,
                        loras=[LoraFile(name="cats", path="/l/cats.safetensors", weight=0.8)],
                        output_dir="/r/outputs/images/p")  # fmt: skip
    assert GenerateSpec.model_validate_json(spec.model_dump_json()) == spec
    assert GenerateSpec.model_validate(json.loads(spec.model_dump_json())) == spec
    assert prompt_file.video is not None
    video = VideoSpec(name="p", options=prompt_file.video, output="/r/outputs/videos/p.mp4")
    assert VideoSpec.model_validate_json(video.model_dump_json()) == video

    code = (
        "import sys; from dropkiln.stages import get_stage; "
        "get_stage('generate'); get_stage('video'); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
