"""PNG parameter chunks (A1111 text and dropkiln JSON), contact sheets, latent previews,
and the scheduler table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from dropkiln.stages.generation.png_files import (
    a1111_parameters,
    contact_sheet,
    latent_preview,
    png_info,
    read_dropkiln_record,
    read_png_text,
    write_png,
)
from dropkiln.stages.generation.prompt_file import ControlRef, ImageTask
from dropkiln.stages.generation.schedulers import SCHEDULER_NAMES, make_scheduler, needs_zero_snr

TASK = ImageTask(
    index=0, entry=0, stem="000-42", prompt="a cat, sitting", negative="blurry", seed=42,
    steps=20, guidance=5.0, width=64, height=96, scheduler="euler_a", clip_skip=2,
)  # fmt: skip


def test_a1111_parameters_text() -> None:
    loras = [{"name": "cats", "weight": 0.8, "sha256": "ab" * 32}]
    text = a1111_parameters(TASK, "tiny-sdxl", "0123456789abcdef", loras)
    assert text.splitlines() == [
        "a cat, sitting <lora:cats:0.8>",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 5, Seed: 42, Size: 64x96, "
        "Model hash: 0123456789, Model: tiny-sdxl, Clip skip: 2, "
        'Lora hashes: "cats: abababababab", Version: dropkiln',
    ]
    control = TASK.model_copy(
        update={"negative": "", "control": [ControlRef(image="/x/p.png", scale=0.5)]}
    )
    plain = a1111_parameters(control, "m", "h" * 10, [])
    assert "Negative prompt" not in plain and 'ControlNet: "tiny: 0.5"' in plain


def test_chunks_round_trip_and_bytes_are_stable(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    record = {"digest": "d", "image": {"prompt": "ünïcode ✓"}}
    info = png_info("a prompt ✓\nSteps: 1", record)
    first = write_png(image, tmp_path / "a.png", info)
    second = write_png(image, tmp_path / "b.png", png_info("a prompt ✓\nSteps: 1", record))
    assert first.read_bytes() == second.read_bytes()
    assert read_png_text(first)["parameters"] == "a prompt ✓\nSteps: 1"
    assert read_dropkiln_record(first) == record
    assert not list(tmp_path.glob(".*.part"))


def test_unreadable_record_is_none(tmp_path: Path) -> None:
    write_png(Image.new("RGB", (4, 4)), tmp_path / "plain.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert read_dropkiln_record(tmp_path / "plain.png") is None
    assert read_dropkiln_record(tmp_path / "broken.png") is None
    assert read_dropkiln_record(tmp_path / "missing.png") is None


def test_contact_sheet_grid(tmp_path: Path) -> None:
    paths = []
    for number in range(5):
        path = tmp_path / f"{number}.png"
        Image.new("RGB", (64, 32), (number * 50, 0, 0)).save(path)
        paths.append(path)
    sheet = contact_sheet(paths, [p.stem for p in paths], tmp_path / "sheet.png")
    with Image.open(sheet) as img:
        # 5 images: 3 columns, 2 rows of cells scaled up to 128 pixels, a one-line label strip
        assert img.size == (3 * 128, 2 * (128 + 14))
        assert img.getpixel((64, 64))[0] == 0 and img.getpixel((128 + 64, 64))[0] == 50


def test_contact_sheet_labels_stay_in_their_cells(tmp_path: Path) -> None:
    # 64-pixel images with long prompt labels: each label must wrap inside its own cell
    # (3 px margins), so the columns where two cells meet carry no text pixels at all.
    paths = []
    for number in range(4):
        path = tmp_path / f"{number}.png"
        Image.new("RGB", (64, 64), (0, 0, 90)).save(path)
        paths.append(path)
    labels = [f"a large red circle on a white background, top left {n}" for n in range(4)]
    sheet = contact_sheet(paths, labels, tmp_path / "sheet.png")
    with Image.open(sheet) as img:
        pixels = img.convert("RGB").load()
        cell_w = img.width // 2
        text_rows = [y for y in range(img.height) if pixels[1, y] != (0, 0, 90)]
        boundary = [cell_w - 2, cell_w - 1, cell_w, cell_w + 1]
        touched = [(x, y) for x in boundary for y in text_rows if pixels[x, y] != (24, 24, 24)]
        assert not touched, f"label pixels at the cell boundary: {touched[:5]}"
        # all of each label is drawn: the wrapped text needs more than one line
        first_label = [y for y in text_rows if y < img.height // 2]
        lit = [y for y in first_label if any(pixels[x, y][0] > 150 for x in range(cell_w))]
        assert max(lit) - min(lit) > 14


def test_latent_preview_is_small_rgb() -> None:
    torch = pytest.importorskip("torch")
    latents = torch.zeros(1, 4, 8, 12)
    preview = latent_preview(latents, is_xl=True)
    assert preview.mode == "RGB" and preview.size == (10 * 12, 10 * 8)
    odd = latent_preview(torch.randn(1, 16, 8, 8), is_xl=False)
    assert odd.size == (128, 128)


BASE_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


@pytest.mark.parametrize(
    ("name", "cls", "karras"),
    [
        ("euler", "EulerDiscreteScheduler", False),
        ("euler_a", "EulerAncestralDiscreteScheduler", None),
        ("dpm++ 2m", "DPMSolverMultistepScheduler", False),
        ("dpm++ 2m karras", "DPMSolverMultistepScheduler", True),
        ("ddim", "DDIMScheduler", None),
        ("unipc", "UniPCMultistepScheduler", False),
    ],
)
def test_scheduler_names(name: str, cls: str, karras: bool | None) -> None:
    pytest.importorskip("diffusers")
    scheduler = make_scheduler(name, BASE_CONFIG)
    assert type(scheduler).__name__ == cls
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.timestep_spacing == "leading"
    if karras is not None:
        assert scheduler.config.use_karras_sigmas is karras
    if cls == "DPMSolverMultistepScheduler":
        assert scheduler.config.algorithm_type == "dpmsolver++"
        assert scheduler.config.solver_order == 2


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_v_prediction_models_get_trailing_spacing_and_zero_snr(name: str) -> None:
    pytest.importorskip("diffusers")
    v_config = {**BASE_CONFIG, "prediction_type": "v_prediction"}
    assert needs_zero_snr(v_config) and not needs_zero_snr(BASE_CONFIG)
    scheduler = make_scheduler(name, v_config)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.rescale_betas_zero_snr is True
    scheduler.set_timesteps(4)
    assert int(scheduler.timesteps[0]) == 999  # trailing spacing starts at the last step


def test_zero_snr_models_get_guidance_rescale() -> None:
    from types import SimpleNamespace

    from dropkiln.stages.generation.render import call_options

    def pipe_with(prediction: str) -> SimpleNamespace:
        config = {**BASE_CONFIG, "prediction_type": prediction}
        return SimpleNamespace(scheduler=SimpleNamespace(config=config))

    task = TASK.model_copy(update={"clip_skip": None})
    assert call_options(pipe_with("v_prediction"), task, None)["guidance_rescale"] == 0.7
    assert "guidance_rescale" not in call_options(pipe_with("epsilon"), task, None)


# A1111's infotext, as A1111 writes and reads it (modules/infotext_utils.py), in words:
# - the text is lines; the last line holds the settings when the settings pattern below
#   finds at least three pairs in it, otherwise it is part of the prompt;
# - the lines before it are the prompt, until a line that starts with "Negative prompt:";
#   from there on (that prefix removed) they are the negative prompt;
# - a setting is: optional spaces, a key that starts with a word character and goes on with
#   word characters, spaces, "-" or "/", a colon, optional spaces, then either a double-
#   quoted string (backslash escapes allowed) or everything up to the next comma; pairs
#   are separated by commas;
# - a value that starts and ends with a double quote is read back with a JSON decoder;
# - when writing, a value with a comma, a colon or a newline is JSON-encoded (non-ASCII
#   kept as it is), every other value is written as it is;
# - `Lora hashes` is one quoted value "name: hash, name: hash" whose names have their
#   commas and colons removed; a LoRA shows in the prompt as <lora:NAME:WEIGHT>.
A1111_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_infotext(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(A1111_SETTING.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_SETTING.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = json.loads(value)
        fields[key] = value
    return fields


HOSTILE_NAMES = [
    "juggernaut, v9",
    "realvis: xl",
    'the "best" model',
    "two\nlines",
    "ünïcødé 猫, ✓",
    "plain",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a1111_reads_every_field_back_for_hostile_names(name: str) -> None:
    task = TASK.model_copy(update={"prompt": "a cat, sitting\nsecond line", "negative": "bad: x"})
    loras = [
        {"name": name, "weight": 0.75, "sha256": "ab" * 32},
        {"name": "/loras/" + "cats.v2.safetensors", "weight": 1.0, "sha256": "cd" * 32},
    ]
    fields = read_infotext(a1111_parameters(task, name, "f0" * 32, loras))
    label = name.replace(",", "").replace(":", "")
    assert fields["Model"] == name
    assert fields["Model hash"] == "f0" * 5
    assert fields["Negative prompt"] == "bad: x"
    assert fields["Prompt"].startswith("a cat, sitting\nsecond line")
    assert "<lora:cats.v2:1>" in fields["Prompt"]
    assert fields["Lora hashes"] == f"{label}: abababababab, cats.v2: cdcdcdcdcdcd"
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("20", "Euler a", "5")
    assert (fields["Seed"], fields["Size"], fields["Clip skip"]) == ("42", "64x96", "2")
    pairs = [part.split(": ", 1)[0] for part in fields["Lora hashes"].split(", ")]
    assert len(pairs) == 2  # each name is one entry, whatever it contained


def test_values_without_separators_are_written_bare() -> None:
    text = a1111_parameters(TASK, "tiny-sdxl", "0" * 64, [])
    assert "Model: tiny-sdxl," in text and "Sampler: Euler a," in text
