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
from dropkiln.stages.generation.prompt_file import (
    ImageEntry,
    LoraRef,
    PromptFile,
    expand_jobs,
)
from dropkiln.stages.generation.prompt_loading import load_prompt_file

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
        load_prompt_file(write(folder, name, text), settings.generate)
    message = str(caught.value)
    assert len(message.splitlines()) <= 2
    assert message.startswith(f"{name}: ")
    return message


def test_toml_fields_defaults_and_overrides(tmp_path: Path, settings: Settings) -> None:
    prompt_file = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings.generate)
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
    assert load_prompt_file(path, settings.generate).vae == "/vaes/sdxl_vae.safetensors"
    path.write_text('vae = ""\n[[image]]\nprompt = "x"\n')
    with pytest.raises(StageError, match="vae"):
        load_prompt_file(path, settings.generate)


def test_json_has_the_same_shape(tmp_path: Path, settings: Settings) -> None:
    import tomllib

    data = tomllib.loads(FULL_TOML)
    from_json = load_prompt_file(write(tmp_path, "p.json", json.dumps(data)), settings.generate)
    from_toml = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings.generate)
    assert from_json == from_toml


def test_txt_one_prompt_a_line_with_settings_defaults(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    settings.generate.steps = 7
    settings.generate.width = 256
    text = "# a comment\n\na red fox\n   \n  a blue bird  \n# another\n"
    prompt_file = load_prompt_file(write(tmp_path, "p.txt", text), settings.generate)
    assert [image.prompt for image in prompt_file.images] == ["a red fox", "a blue bird"]
    assert {(image.steps, image.width) for image in prompt_file.images} == {(7, 256)}
    assert prompt_file.model is None and prompt_file.video is None


def test_file_defaults_override_settings(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    settings.generate.guidance = 9.0
    text = '[defaults]\nsteps = 3\n[[image]]\nprompt = "x"\n'
    (image,) = load_prompt_file(write(tmp_path, "p.toml", text), settings.generate).images
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
        ('[[image]]\nprompt = "a"\nbatch_size = 0\n', "image[0].batch_size:"),
        ('[defaults]\nbatch_size = 65\n[[image]]\nprompt = "a"\n', "defaults.batch_size:"),
        ('[[image]]\nprompt = "a"\nbatch_size = 2.0\n', "image[0].batch_size:"),
        ('[[image]]\nprompt = "a"\ncontrol = { image = "p.png", start = 0.5, end = 0.5 }\n',
         "image[0].control[0]: start (0.5) must be before end (0.5)"),
        ('[[image]]\nprompt = "a"\ncontrol = { image = "p.png", end = 1.5 }\n',
         "image[0].control[0].end:"),
        ('[[image]]\nprompt = "a"\ncontrol = { image = "p.png", preprocess = "depth" }\n',
         "image[0].control[0].preprocess: Input should be 'none' or 'canny'"),
        ('[[image]]\nprompt = "a"\ncontrol = []\n', "image[0].control: List should have at least"),
        ('[[image]]\nprompt = "a"\ncontrol = [' + '{ image = "p.png" }, ' * 5 + ']\n',
         "image[0].control: List should have at most 4 items"),
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
    (image,) = load_prompt_file(write(folder, "p.toml", text), settings.generate).images
    assert image.control is not None
    (control,) = image.control
    assert control.image == str((folder / "pose.png").resolve())
    assert (control.model, control.scale, control.start, control.end) == ("tiny", 0.5, 0, 1)


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


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ('init_image = "start.png"\nstrength = 1.5', "image[1].strength: Input should be less"),
        ('init_image = "start.png"\nstrength = -0.1', "image[1].strength: Input should be great"),
        ('init_image = "small.png"', "'small.png' is 32x32, the entry is 64x64"),
        ('init_image = "start.png"\nmask = "rgb-mask.png"', "mask: 'rgb-mask.png' has RGB"),
        ('init_image = "start.png"\nmask = "small-mask.png"', "image[1].mask: 'small-mask.png' is"),
        ('mask = "mask.png"', "image[1]: mask: needs an init_image"),
        ('init_image = "../outside.png"', "image[1].init_image: '../outside.png' leaves"),
        ('init_image = "start.png"\nmask = "/tmp/m.png"', "image[1].mask: '/tmp/m.png' must be"),
        ('init_image = "nothere.png"', "image[1].init_image: 'nothere.png' does not exist"),
        ('init_image = "start.png"\ncontrol = { image = "start.png" }', "together with control"),
    ],
)  # fmt: skip
def test_bad_init_images_and_masks_name_the_entry_and_field(
    tmp_path: Path, settings: Settings, fields: str, expected: str
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "start.png")
    Image.new("RGB", (32, 32)).save(folder / "small.png")
    Image.new("L", (64, 64)).save(folder / "mask.png")
    Image.new("RGB", (64, 64)).save(folder / "rgb-mask.png")
    Image.new("L", (32, 32)).save(folder / "small-mask.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    two = '[[image]]\nprompt = "a"\n[[image]]\nprompt = "b"\n'
    text = f"[defaults]\nwidth = 64\nheight = 64\n{two}{fields}\n"
    assert expected in load_error(folder, settings, "p.toml", text)


def test_init_image_and_mask_are_resolved_beside_the_prompt_file(
    tmp_path: Path, settings: Settings
) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    Image.new("1", (64, 64)).save(tmp_path / "mask.png")
    text = '[[image]]\nprompt = "a"\nwidth = 64\nheight = 64\ninit_image = "start.png"\n'
    text += 'mask = "mask.png"\n'
    (image,) = load_prompt_file(write(tmp_path, "p.toml", text), settings.generate).images
    assert image.init_image == str((tmp_path / "start.png").resolve())
    assert image.mask == str((tmp_path / "mask.png").resolve())
    assert image.strength == 0.75


def test_expand_jobs_gives_consecutive_seeds_and_stems(tmp_path: Path, settings: Settings) -> None:
    prompt_file = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings.generate)
    tasks = expand_jobs(prompt_file)
    assert [(t.index, t.entry, t.seed, t.stem) for t in tasks] == [
        (0, 0, 10, "000-10-cat"),
        (1, 0, 11, "001-11-cat"),
        (2, 1, 99, "002-99"),
    ]
    assert tasks[2].width == 128 and tasks[0].negative == "blurry"


def test_prompts_and_vary_expand_to_the_product_with_names_from_the_values(
    tmp_path: Path, settings: Settings
) -> None:
    text = """
[defaults]
width = 64
height = 64
[[image]]
prompts = ["a cat", "a dog"]
[[image]]
prompt = "a fox"
name = "fox"
vary = { seed = [1, 2, 3], guidance = [4, 7.5] }
"""
    tasks = expand_jobs(load_prompt_file(write(tmp_path, "m.toml", text), settings.generate))
    assert [(t.prompt, t.seed) for t in tasks[:2]] == [("a cat", 1), ("a dog", 1)]
    assert [(t.stem, t.guidance) for t in tasks[2:]] == [
        ("002-1-fox-guidance-4", 4.0),
        ("003-2-fox-guidance-4", 4.0),
        ("004-3-fox-guidance-4", 4.0),
        ("005-1-fox-guidance-7.5", 7.5),
        ("006-2-fox-guidance-7.5", 7.5),
        ("007-3-fox-guidance-7.5", 7.5),
    ]
    # the table's key order does not rename anything
    swapped = text.replace(
        "{ seed = [1, 2, 3], guidance = [4, 7.5] }", "{ guidance = [4, 7.5], seed = [1, 2, 3] }"
    )
    again = expand_jobs(load_prompt_file(write(tmp_path, "s.toml", swapped), settings.generate))
    assert [t.stem for t in again] == [t.stem for t in tasks]
    schedulers = '[[image]]\nprompt = "a"\nvary = { scheduler = ["euler", "dpm++ 2m karras"] }\n'
    stems = [t.stem for t in expand_jobs(load_prompt_file(write(tmp_path, "d.toml", schedulers),
                                                          settings.generate))]  # fmt: skip
    assert stems == ["000-1-scheduler-euler", "001-1-scheduler-dpm---2m-karras"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[image]]\nprompts = []\n', "image[0].prompts: List should have at least 1 item"),
        ('[[image]]\nprompts = ["a", ""]\n', "image[0].prompts[1]:"),
        ('[[image]]\nprompts = "a"\n', "image[0].prompts:"),
        ('[[image]]\nprompt = "a"\nprompts = ["b"]\n', "image[0].prompts: give prompt or"),
        ('[[image]]\nprompt = "a"\nvary = { sed = [1] }\n', "image[0].vary.sed:"),
        ('[[image]]\nprompt = "a"\nvary = { seed = [] }\n', "image[0].vary.seed:"),
        ('[[image]]\nprompt = "a"\nvary = { seed = 3 }\n', "image[0].vary.seed:"),
        ('[[image]]\nprompt = "a"\nseed = 2\nvary = { seed = [1] }\n', "also set directly"),
        ('[[image]]\nprompt = "a"\nvary = { steps = ["x"] }\n', "image[0].steps:"),
        ('[[image]]\nprompt = "a"\nvary = "x"\n', "image[0].vary:"),
        ('[[image]]\nprompts = ["a"]\nvary = { prompt = ["b"] }\n', "not both"),
        ('[[image]]\nprompt = "a"\nvary = { seed = ' + str(list(range(200))) + ', steps = '
         + str(list(range(1, 101))) + ' }\n', "20,000 entries in all; at most 10,000"),
    ],
)  # fmt: skip
def test_bad_prompts_and_vary_name_the_entry_and_field(
    tmp_path: Path, settings: Settings, text: str, expected: str
) -> None:
    assert expected in load_error(tmp_path, settings, "bad.toml", text)


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

    prompt_file = load_prompt_file(write(tmp_path, "p.toml", FULL_TOML), settings.generate)
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


def test_a_prompt_file_pins_a_device_class_that_its_spec_leaves_out(
    tmp_path: Path, settings: Settings
) -> None:
    path = write(tmp_path, "p.toml", 'device_class = "24gb"\n[[image]]\nprompt = "x"\n')
    prompt_file = load_prompt_file(path, settings.generate)
    assert prompt_file.device_class == "24gb"
    # Where the jobs run is not what they render: the spec (and its digests) stays the same.
    assert "device_class" not in prompt_file.model_dump(mode="json")
    unpinned = load_prompt_file(
        write(tmp_path, "q.toml", '[[image]]\nprompt = "x"\n'), settings.generate
    )
    assert unpinned.device_class is None
    assert unpinned.model_dump(mode="json") == prompt_file.model_dump(mode="json")


@pytest.mark.parametrize(
    "value",
    ['""', "24", "true", '"two words"', '["24gb"]'],
)
def test_a_bad_device_class_names_the_file_and_field(
    tmp_path: Path, settings: Settings, value: str
) -> None:
    text = f'device_class = {value}\n[[image]]\nprompt = "x"\n'
    assert "device_class:" in load_error(tmp_path, settings, "bad.toml", text)
