"""``dropkiln demo``: the whole pipeline on a generated sample, in one command.

Creates a home (temporary unless --root is given), starts the daemon in this process,
drops a small generated dataset, then a prompt file that uses the LoRA trained from it
and asks for a video, prints progress as the events arrive, and prints where the
outputs are. Exit status 0 only if every job succeeded.
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
# Settings of the dropkiln demo: the tiny built-in model at 64x64, a few training steps.
model = "tiny-sdxl"
settle_seconds = 0.3

[bucket]
resolution = 64
bucket_step = 32
min_side = 32
max_side = 128

[train]
steps = 12
checkpoint_every = 4
rank = 4
learning_rate = 1e-3

[generate]
steps = 4
width = 64
height = 64
guidance = 3.0
"""

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square")

PROMPT_FILE = """\
loras = [{ name = "shapes", weight = 0.8 }]

[defaults]
steps = 4
width = 64
height = 64
seed = 7

[[image]]
prompt = "a red circle, plain background"
count = 2
name = "red-circle"

[[image]]
prompt = "a blue square, plain background"
count = 2
name = "blue-square"

[video]
kind = "slideshow"
fps = 8
seconds_per_image = 0.5
transition = "crossfade"
"""


def write_sample_dataset(folder: Path, size: int = 64) -> int:
    """Eight small pictures of coloured shapes with tag captions and a dataset.toml."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.new("RGB", (size, size + (16 if shape == "square" else 0)), "white")
            draw = ImageDraw.Draw(image)
            box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
            if shape == "circle":
                draw.ellipse(box, fill=rgb)
            else:
                draw.rectangle(box, fill=rgb)
            stem = f"{colour}-{shape}"
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(f"shapes, a {colour} {shape}, plain background")
            count += 1
    (folder / "dataset.toml").write_text(
        'validation_prompts = ["shapes, a green circle, plain background"]\nseed = 3\n'
    )
    return count


def _place(build: Path, target: Path) -> None:
    """Move a finished drop into view in one rename, as a careful user would."""
    build.rename(target)


async def _drive(settings: Settings, out: Any) -> bool:
    from dropkiln.daemon.service import Daemon
    from dropkiln.store import list_jobs

    daemon = Daemon(settings)
    ok = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=True))
        await daemon.started.wait()
        store = daemon.store
        paths = settings.paths
        staging = paths.root / "staging"
        staging.mkdir(exist_ok=True)
        n = write_sample_dataset(staging / "shapes")
        print(f"dropping a sample dataset: {n} images -> {paths.datasets / 'shapes'}", file=out)
        _place(staging / "shapes", paths.datasets / "shapes")
        follower = _Follower(out)
        prompt_dropped = False
        while True:
            await anyio.sleep(0.2)
            await follower.show(store)
            jobs = await list_jobs(store)
            if not prompt_dropped and any(j.stage == "train" for j in jobs):
                (staging / "demo.toml").write_text(PROMPT_FILE)
                print(f"dropping a prompt file -> {paths.prompts / 'demo.toml'}", file=out)
                _place(staging / "demo.toml", paths.prompts / "demo.toml")
                prompt_dropped = True
            drops = await _drops(store)
            if any(d["state"] == "failed" for d in drops):
                break
            prompts_taken = any(d["kind"] == "prompts" for d in drops)
            if prompts_taken and all(j.terminal for j in jobs):
                ok = all(j.state == "succeeded" for j in jobs)
                break
        await follower.show(store)
        daemon.stop("demo finished")
    shutil.rmtree(paths.root / "staging", ignore_errors=True)
    return ok


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
    lines = []
    for lora in sorted(paths.loras.glob("*/*.safetensors")):
        lines.append(f"LoRA:   {lora}")
    for image in sorted(paths.images.glob("*/*.png")):
        lines.append(f"image:  {image}")
    for video in sorted(paths.videos.glob("*")):
        lines.append(f"video:  {video}")
    return lines


def run_demo(root: Path | None = None, out: Any = None) -> int:
    """Run the demo; returns the process exit status."""
    out = out or sys.stdout
    home = Path(tempfile.mkdtemp(prefix="dropkiln-demo-")) if root is None else root
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dropkiln.toml"
    if not config.exists():
        config.write_text(DEMO_CONFIG)
    settings = Settings.load(root=home)
    print(f"dropkiln demo in {settings.root}", file=out)
    started = time.monotonic()
    ok = anyio.run(_drive, settings, out)
    elapsed = time.monotonic() - started
    print("", file=out)
    for line in _outputs(settings):
        print(line, file=out)
    print(f"{'finished' if ok else 'FAILED'} in {elapsed:.0f} s", file=out)
    print(f"everything is in {settings.root} (remove it when done)", file=out)
    return 0 if ok else 1
