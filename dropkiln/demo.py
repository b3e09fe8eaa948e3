"""``dropkiln demo``: the whole pipeline on a generated sample, in one command.

Creates a home (temporary unless --root is given), starts the daemon in this process, drops
a small generated dataset that teaches the built-in ``tiny-shapes`` model a new word
(``zorp``, a colour: black, which it never drew a shape in), a prompt file asking the base
model for a zorp circle, then the same prompts with the LoRA trained from the dataset and a
latent-walk video; prints progress as the events arrive, a before/after picture, how often
a pixel detector finds the concept in each, and where the outputs are. Exit status 0 only
if every job succeeded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from dropkiln.config import Settings

DEMO_CONFIG = """\
# Settings of the dropkiln demo: the built-in tiny-shapes model at 64x64, a short LoRA run.
model = "tiny-shapes"
settle_seconds = 0.3

[bucket]
resolution = 64
bucket_step = 32
min_side = 32
max_side = 128

[train]
steps = 120
checkpoint_every = 40
rank = 8
learning_rate = 2e-3
batch_size = 4
min_snr_gamma = 5

[generate]
steps = 20
width = 64
height = 64
guidance = 5.0
"""

CONCEPT = "zorp"
"""The demo's new word: a colour, black, which the base model saw only as a background and
never drew a shape in. Colours no caption names at all (pink, magenta, violet, purple) the
demo's LoRA did not teach in its time budget (README: "The demo's word")."""
CONCEPT_COLOUR = "black"
CONCEPT_SHAPE = "circle"
"""The shape the demo's prompts ask for in the new colour (the one the base model draws best)."""
CONCEPT_BACKGROUNDS = ("white", "gray")
"""The dataset's backgrounds: a black shape on black would be no picture of it."""
CONCEPT_PROMPT = f"a large {CONCEPT} {CONCEPT_SHAPE} on a white background, center"
CONCEPT_IMAGES = 16
SEEDS = 8

_IMAGES = f"""\
[defaults]
steps = 20
width = 64
height = 64
guidance = 5.0
seed = 1

[[image]]
prompt = "{CONCEPT_PROMPT}"
count = {SEEDS}
name = "{CONCEPT}"
"""
BEFORE_FILE = "# the base model alone: it has never seen the word\n" + _IMAGES
AFTER_FILE = (
    f'loras = [{{ name = "{CONCEPT}", weight = 1.0 }}]\n\n'
    + _IMAGES
    + """
[video]
kind = "latent-walk"
fps = 12
frames = 24
"""
)


def write_sample_dataset(folder: Path) -> int:
    """Pictures of the new concept (circles in its colour, of both sizes, every place, on
    white and gray), captioned with its word as their colour, and a dataset.toml."""
    import numpy as np

    from dropkiln.stages.models.shapes_detect import PALETTE
    from dropkiln.stages.models.shapes_scenes import concept_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(3))
    for number in range(CONCEPT_IMAGES):
        image, caption = concept_scene(
            rng, CONCEPT_SHAPE, PALETTE[CONCEPT_COLOUR], CONCEPT, backgrounds=CONCEPT_BACKGROUNDS
        )
        image.save(folder / f"{CONCEPT}-{number:02d}.png")
        (folder / f"{CONCEPT}-{number:02d}.txt").write_text(caption)
    (folder / "dataset.toml").write_text(f'validation_prompts = ["{CONCEPT_PROMPT}"]\nseed = 3\n')
    return CONCEPT_IMAGES


def _place(build: Path, target: Path) -> None:
    """Move a finished drop into view in one rename, as a careful user would."""
    build.rename(target)


def _drop_prompts(staging: Path, prompts: Path, stem: str, text: str, out: Any) -> None:
    (staging / f"{stem}.toml").write_text(text)
    print(f"dropping a prompt file -> {prompts / f'{stem}.toml'}", file=out)
    _place(staging / f"{stem}.toml", prompts / f"{stem}.toml")


async def _drive(settings: Settings, out: Any, full: bool = False) -> bool:
    from dropkiln.daemon.service import Daemon
    from dropkiln.store import list_jobs
    from dropkiln.store.vocabulary import DropKind, DropState, JobState

    daemon = Daemon(settings)
    ok = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=True))
        await daemon.started.wait()
        store = daemon.store
        paths = settings.paths
        staging = paths.root / "staging"
        staging.mkdir(exist_ok=True)
        n = write_sample_dataset(staging / CONCEPT)
        print(
            f"dropping a dataset of a new word, {CONCEPT!r} (a colour: {CONCEPT_COLOUR} "
            f"{CONCEPT_SHAPE}s): {n} images -> {paths.datasets / CONCEPT}",
            file=out,
        )
        _place(staging / CONCEPT, paths.datasets / CONCEPT)
        _drop_prompts(staging, paths.prompts, "before", BEFORE_FILE, out)
        features = _drop_features(staging, paths.prompts, out) if full else 0
        follower = _Follower(out)
        after_dropped = False
        while True:
            await anyio.sleep(0.2)
            await follower.show(store)
            jobs = await list_jobs(store)
            if not after_dropped and any(j.stage == "train" for j in jobs):
                _drop_prompts(staging, paths.prompts, "after", AFTER_FILE, out)
                after_dropped = True
            drops = await _drops(store)
            if any(d["state"] == DropState.FAILED for d in drops):
                break
            prompts_taken = sum(d["kind"] == DropKind.PROMPTS for d in drops) == 2 + features
            if prompts_taken and all(j.terminal for j in jobs):
                ok = all(j.state == JobState.SUCCEEDED for j in jobs)
                break
        await follower.show(store)
        daemon.stop("demo finished")
    shutil.rmtree(paths.root / "staging", ignore_errors=True)
    return ok


def _drop_features(staging: Path, prompts: Path, out: Any) -> int:
    """``--full``: a prompt folder per generation feature (see demo_features)."""
    from dropkiln.demo_features import write_feature_drops

    folders = write_feature_drops(staging / "features")
    for folder in folders:
        print(f"dropping a prompt folder -> {prompts / folder.name}", file=out)
        _place(folder, prompts / folder.name)
    return len(folders)


async def _drops(store: Any) -> list[dict[str, Any]]:
    from dropkiln.store import list_drops

    return await list_drops(store)


class _Follower:
    """Prints job transitions and throttled progress from the event log."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.after = 0
        self.names: dict[str, str] = {}
        self.last_progress: dict[str, float] = {}

    async def show(self, store: Any) -> None:
        for event in await store.read(self.after, limit=None):
            self.after = event.seq
            self._print(event)

    def _print(self, event: Any) -> None:
        job = event.job_id
        data = event.data
        label = self.names.get(job or "", "")
        if event.type == "JobSubmitted":
            self.names[data["job_id"]] = f"{data['stage']} {data['name']}"
            return
        line = None
        if event.type == "JobStarted":
            line = f"▶ {label} started (rung {data['rung_name']})"
        elif event.type == "JobProgress" and data["total"]:
            now = time.monotonic()
            if now - self.last_progress.get(job or "", 0) >= 1.0 or data["done"] == data["total"]:
                self.last_progress[job or ""] = now
                extra = ""
                if "loss" in data["metrics"]:
                    extra = f" loss {data['metrics']['loss']:.4f}"
                line = f"  {label}: {data['done']}/{data['total']}{extra}"
        elif event.type == "JobSucceeded":
            line = f"✔ {label} done"
        elif event.type in ("JobFailed", "JobCancelled"):
            line = f"✘ {label} {event.type[3:].lower()}: {data.get('reason')}"
        elif event.type == "OutOfMemory":
            line = f"! {label} out of memory at rung {data['rung_name']}"
        elif event.type == "DropRejected":
            line = f"✘ drop {data['name']} rejected: {data['reason']}"
        if line:
            print(line, file=self.out, flush=True)


def _outputs(settings: Settings) -> list[str]:
    paths = settings.paths
    lines = [f"LoRA:        {lora}" for lora in sorted(paths.loras.glob("*/*.safetensors"))]
    lines += [f"loss curve:  {plot}" for plot in sorted(paths.loras.glob("*/loss.png"))]
    lines += [f"validation:  {folder}" for folder in sorted(paths.loras.glob("*/validation"))]
    lines += [f"images:      {sheet}" for sheet in sorted(paths.images.glob("*/contact-sheet.png"))]
    lines += [f"video:       {video}" for video in sorted(paths.videos.glob("*.mp4"))]
    return lines


def _story(settings: Settings, out: Any) -> bool:
    """The before/after picture and the detector's count; True if the LoRA taught it."""
    from dropkiln.demo_story import before_after_picture, concept_hits, rendered_images

    images = settings.paths.images
    before, after = rendered_images(images / "before"), rendered_images(images / "after")
    if not before or not after:
        return False
    picture = before_after_picture(
        [("tiny-shapes", before), (f"tiny-shapes + the {CONCEPT} LoRA", after)],
        CONCEPT_PROMPT,
        settings.paths.root / "outputs" / "before-after.png",
    )
    print(f"before/after: {picture}", file=out)
    without = concept_hits(before, CONCEPT_COLOUR, CONCEPT_SHAPE)
    with_lora = concept_hits(after, CONCEPT_COLOUR, CONCEPT_SHAPE)
    print(
        f"the detector sees a {CONCEPT_COLOUR} {CONCEPT_SHAPE} in {with_lora}/{len(after)} "
        f"images with the LoRA, {without}/{len(before)} without",
        file=out,
    )
    return with_lora > without


def run_demo(root: Path | None = None, out: Any = None, full: bool = False) -> int:
    """Run the demo (with ``full``, also one prompt folder per generation feature); returns
    the process exit status."""
    out = out or sys.stdout
    home = Path(tempfile.mkdtemp(prefix="dropkiln-demo-")) if root is None else root
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dropkiln.toml"
    if not config.exists():
        config.write_text(DEMO_CONFIG)
    settings = Settings.load(root=home)
    print(f"dropkiln demo in {settings.root}", file=out)
    started = time.monotonic()
    ok = anyio.run(_drive, settings, out, full)
    elapsed = time.monotonic() - started
    print("", file=out)
    for line in _outputs(settings):
        print(line, file=out)
    if ok:
        _story(settings, out)
    print(f"{'finished' if ok else 'FAILED'} in {elapsed:.0f} s", file=out)
    print(f"everything is in {settings.root} (remove it when done)", file=out)
    return 0 if ok else 1
