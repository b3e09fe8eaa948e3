"""The pipeline under test: a dataset → its LoRA → a prompt file using it → images → a video.

Also what a finished run left behind (every output file by content), and the checks that
outputs are whole: PNGs decode, the LoRA loads, no temp file is taken for an output.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageDraw

from tests.reliability.home import CONFIG, TERMINAL, Home, terminal_events

DATASET = "shapes"
PROMPTS = "pictures"
LORA_TIME_KEYS = (
    "ss_training_started_at",
    "ss_training_finished_at",
    "modelspec.date",
    "sshs_legacy_hash",  # kohya takes it over the file with its ss_* keys, times included
)
"""Kohya header keys that record when training ran: the only bytes two runs may differ in."""

PROMPT_FILE = """\
loras = [{{ name = "{dataset}", weight = 0.8 }}]

[defaults]
steps = {steps}
width = 64
height = 64
seed = 7

[[image]]
prompt = "shapes, a red circle, plain background"
count = {count}
name = "red-circle"

[[image]]
prompt = "shapes, a blue square, plain background"
negative = "blurry"
count = {count}
name = "blue-square"

[video]
kind = "slideshow"
fps = 4
seconds_per_image = 1.0
transition = "crossfade"
"""


@dataclass(frozen=True)
class Pipeline:
    """What the pipeline runs with: the home's dropkiln.toml and the prompt file's size."""

    config: str = CONFIG
    count: int = 2
    """Images of each of the prompt file's two entries."""
    image_steps: int = 3

    @property
    def images(self) -> int:
        return 2 * self.count

    def prompt_file(self) -> str:
        return PROMPT_FILE.format(dataset=DATASET, steps=self.image_steps, count=self.count)

    def home(self, root: Path) -> Home:
        return Home(root, self.config)


STANDARD = Pipeline()
JOBS = 5  # bucket, cache, train, generate, video

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}


def write_dataset(folder: Path) -> Path:
    """Six small pictures of coloured shapes with captions and a validation prompt."""
    folder.mkdir(parents=True)
    for number, (colour, rgb) in enumerate(COLOURS.items()):
        for shape in ("circle", "square"):
            image = Image.new("RGB", (64, 64 + 32 * (shape == "square")), "white")
            draw = ImageDraw.Draw(image)
            box = (12 + number, 12, 52, 52)
            if shape == "circle":
                draw.ellipse(box, fill=rgb)
            else:
                draw.rectangle(box, fill=rgb)
            image.save(folder / f"{colour}-{shape}.png")
            (folder / f"{colour}-{shape}.txt").write_text(f"shapes, a {colour} {shape}")
    (folder / "dataset.toml").write_text(
        'validation_prompts = ["shapes, a green circle"]\nseed = 3\n'
    )
    return folder


def drop_dataset(home: Home) -> None:
    home.drop(write_dataset(home.staging(DATASET)), "dataset")


def drop_prompt_file(home: Home, pipeline: Pipeline = STANDARD) -> None:
    staged = home.staging(f"{PROMPTS}.toml")
    staged.write_text(pipeline.prompt_file())
    home.drop(staged, "prompts")


def dataset_planned(home: Home) -> bool:
    return any(job["stage"] == "train" for job in home.jobs())


def run_undisturbed(home: Home, pipeline: Pipeline = STANDARD) -> list[dict[str, Any]]:
    """The whole pipeline with nothing in its way; returns the jobs."""
    drop_dataset(home)
    try:
        return finish(home, PromptDropper(pipeline))
    finally:
        home.stop()


# What a run left behind ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """Every output file of the pipeline by path relative to ROOT/outputs, as content.

    A .safetensors file is compared as (header, data): the safetensors writer lays out its
    ``__metadata__`` map in Rust HashMap order, which changes from process to process, so
    the same tensors and metadata give different header bytes. The data section and the
    parsed header are what must not change (the kohya header minus its training times).
    """

    files: dict[str, Any]
    root: Path
    """The ROOT they came from (its state/ too, for sizes)."""

    def __repr__(self) -> str:
        return f"Outputs({sorted(self.files)})"


def collect_outputs(root: Path) -> Outputs:
    """Every output file's content, TensorBoard's event files apart: they are named by
    wall-clock time, host and pid, and every attempt of a job starts a new one, so they
    can never match byte for byte. Their series after a stop and a resume are compared
    with TensorBoard's own reader in tests/stages/test_train.py; here a run must still
    leave some."""
    outputs = root / "outputs"
    files = {
        str(path.relative_to(outputs)): file_content(path)
        for path in sorted(outputs.rglob("*"))
        if path.is_file() and "tensorboard" not in path.relative_to(outputs).parts
    }
    for board in outputs.glob("loras/*/tensorboard"):
        events = sorted(board.rglob("events.out.tfevents.*"))
        files[str(board.relative_to(outputs))] = "event files" if events else "none"
    return Outputs(files, root)


def file_content(path: Path) -> Any:
    """The bytes, or for safetensors (timeless header as sorted JSON, data section)."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return data
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__", {})
    for key in LORA_TIME_KEYS:
        metadata.pop(key, None)
    return json.dumps(header, sort_keys=True), data[8 + length :]


def read_lora(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """(tensor name → raw bytes, header metadata) of a safetensors file; raises if damaged."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name).tobytes() for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata


def assert_same_outputs(got: Outputs, reference: Outputs, ignore: tuple[str, ...] = ()) -> None:
    """The same output files with the same content as the reference run."""
    extra = sorted(set(got.files) - set(reference.files))
    missing = sorted(set(reference.files) - set(got.files))
    assert not extra and not missing, f"extra output files {extra}, missing {missing}"
    different = [
        path
        for path in reference.files
        if path not in ignore and got.files[path] != reference.files[path]
    ]
    assert not different, f"outputs differ from the undisturbed run: {different}"


def assert_outputs_whole(
    root: Path, jobs: list[dict[str, Any]], pipeline: Pipeline = STANDARD
) -> None:
    """No temp file left as an output; every PNG decodes; images count exactly as planned."""
    outputs = root / "outputs"
    stray = [
        str(p.relative_to(root))
        for p in outputs.rglob("*")
        if p.name.startswith(".") or p.name.endswith(".part")
    ]
    assert not stray, f"partial files left among the outputs: {stray}"
    for png in outputs.rglob("*.png"):
        with Image.open(png) as image:
            image.load()
    generate = next(j for j in jobs if j["stage"] == "generate")
    images = sorted(Path(p).name for p in generate["result"]["images"])
    on_disk = sorted(p.name for p in Path(generate["result"]["output_dir"]).glob("0*.png"))
    assert on_disk == images and len(images) == pipeline.images, (on_disk, images)
    video = next(j for j in jobs if j["stage"] == "video")
    data = Path(video["result"]["video"]).read_bytes()
    assert data[4:8] == b"ftyp", "the video is not an MP4"
    read_lora(outputs / "loras" / DATASET / f"{DATASET}.safetensors")


def png_pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


class DropsPrompts(Protocol):
    """Drops the prompt file when its time has come (looked at while waiting)."""

    def poll(self, home: Home) -> None: ...


class PromptDropper:
    """Drops the prompt file as soon as the dataset's train job exists (the LoRA it names)."""

    def __init__(self, pipeline: Pipeline = STANDARD) -> None:
        self.pipeline = pipeline
        self.dropped = False

    def poll(self, home: Home) -> None:
        if not self.dropped and dataset_planned(home):
            drop_prompt_file(home, self.pipeline)
            self.dropped = True


def finish(
    home: Home, prompts: DropsPrompts, timeout: float = 240, faults: str = ""
) -> list[dict[str, Any]]:
    """Start the daemon once more, let every job end, stop it with SIGTERM (exit 0)."""
    home.start(faults=faults)
    home.wait_serving()

    def done(h: Home) -> bool:
        prompts.poll(h)
        jobs = h.jobs()
        return len(jobs) >= JOBS and all(j["state"] in TERMINAL for j in jobs)

    home.wait_for(done, timeout, "every job to end")
    assert home.terminate() == 0, home.log_text()[-3000:]
    return home.jobs()


def assert_finished_once(
    home: Home, jobs: list[dict[str, Any]], reference: Outputs, pipeline: Pipeline = STANDARD
) -> None:
    """Every job succeeded with exactly one terminal event, every attempt is accounted for,
    both drops were taken once and kept, the store checks out, and the outputs are whole and
    equal to the undisturbed run's."""
    assert [j["state"] for j in jobs] == ["succeeded"] * JOBS, [
        (j["stage"], j["state"], j["error"]) for j in jobs
    ]
    events = home.events()
    ends = terminal_events(events)
    assert ends == {j["id"]: ["JobSucceeded"] for j in jobs}, ends
    for job in jobs:
        kinds = [e["type"] for e in home.events_of(job["id"])]
        ended_early = sum(
            kinds.count(t) for t in ("JobInterrupted", "JobPreempted", "RetryScheduled")
        )
        assert kinds.count("JobStarted") == ended_early + 1, (job["stage"], kinds)
    taken = sorted(e["data"]["name"] for e in events if e["type"] == "Dropped")
    assert taken == sorted([DATASET, PROMPTS]), taken
    unwanted = [e["type"] for e in events if e["type"] in ("DropRejected", "DropRecognised")]
    assert not unwanted, unwanted
    drop = home.root / "drop"
    assert not any((drop / "datasets").iterdir()) and not any((drop / "prompts").iterdir())
    kept = sorted(p.name.split("-", 1)[1] for p in (drop / "processed").iterdir())
    assert kept == sorted([DATASET, f"{PROMPTS}.toml"]), kept
    check = home.cli("store", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert_outputs_whole(home.root, jobs, pipeline)
    assert_same_outputs(collect_outputs(home.root), reference)
