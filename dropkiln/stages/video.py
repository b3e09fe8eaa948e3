"""The video stage: the generate job's images (or latent-walk frames) → MP4, GIF or WebP.

It runs on the CPU lane. A latent walk needs the diffusion model, so its frames are
rendered by the generate job on the GPU (it has the warm pipeline and the memory ladder)
and listed in its result; this stage only composes and encodes, for both kinds.
Frames go to ``work_dir/frames`` as they are made, so a retry continues where it stopped.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from dropkiln.stages.base import (
    StageContext,
    StageDef,
    StageError,
    StageSpec,
    StageStopped,
    atomic_path,
)
from dropkiln.stages.encode import AudioTrack, encode_frames, encode_timeout, frame_name
from dropkiln.stages.generation.png_files import write_png
from dropkiln.stages.generation.prompt_file import VideoOptions

CHECKPOINT_EVERY = 12
CROSSFADE_SECONDS = 0.5


class VideoSpec(StageSpec):
    """Make the video of one prompt file; the frames come from ``ctx.upstream("generate")``."""

    name: str
    options: VideoOptions
    output: str
    """ROOT/outputs/videos/STEM.mp4 (or .gif / .webp, as ``options.format`` says)."""


def video_path(videos_dir: Path, stem: str, options: VideoOptions) -> Path:
    """Where the video of prompt file ``stem`` goes: ROOT/outputs/videos/STEM.mp4 (.gif, .webp)."""
    return videos_dir / f"{stem}.{options.format}"


@dataclass(frozen=True)
class FrameRecipe:
    """One output frame: source ``first`` blended towards ``second`` by ``mix``."""

    first: int
    second: int | None = None
    mix: float = 0.0
    shown: float = 0.0
    """Ken Burns: how far through its time on screen ``first`` is (0 to 1)."""


def slideshow_plan(images: int, options: VideoOptions) -> list[FrameRecipe]:
    """Each image held ``seconds_per_image``; a crossfade into the next ends each hold."""
    per_image = max(1, round(options.seconds_per_image * options.fps))
    fade = 0
    if options.transition == "crossfade":
        fade = min(per_image // 2, max(1, round(CROSSFADE_SECONDS * options.fps)))
    moving = options.motion == "ken-burns"
    plan = []
    for image in range(images):
        for frame in range(per_image):
            into_fade = frame - (per_image - fade)
            shown = frame / max(1, per_image - 1) if moving else 0.0
            if image + 1 < images and into_fade >= 0:
                mix = (into_fade + 1) / (fade + 1)
                plan.append(FrameRecipe(image, image + 1, mix, shown))
            else:
                plan.append(FrameRecipe(image, shown=shown))
    return plan


def interpolated_plan(frames: int, between: int) -> list[FrameRecipe]:
    """Every rendered frame, with ``between`` blends of it into the next after each."""
    plan = []
    for index in range(frames):
        plan.append(FrameRecipe(index))
        if index + 1 < frames:
            plan += [FrameRecipe(index, index + 1, step / (between + 1))
                     for step in range(1, between + 1)]  # fmt: skip
    return plan


Box = tuple[float, float, float, float]


def ken_burns_box(index: int, shown: float, zoom: float, size: tuple[int, int]) -> Box:
    """The part of image ``index`` on screen ``shown`` of the way through: zoomed from the
    whole image to 1/``zoom`` of it, panning towards the right edge (even images) or the
    left (odd ones), so neighbours move against each other."""
    width, height = size
    scale = 1 + (zoom - 1) * shown
    box_w, box_h = width / scale, height / scale
    slack = (width - box_w) / 2
    direction = 1 if index % 2 == 0 else -1
    centre_x = width / 2 + direction * slack
    centre_y = height / 2
    return (centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2, centre_y + box_h / 2)


def run_video(spec: VideoSpec, ctx: StageContext) -> dict[str, Any]:
    """Compose the frames (resuming), then encode them into ``spec.output``."""
    upstream = ctx.upstream("generate")
    options = spec.options
    if options.kind == "slideshow":
        sources = [Path(p) for p in upstream.get("images", [])]
        plan = slideshow_plan(len(sources), options)
    else:
        sources = [Path(p) for p in upstream.get("walk_frames", [])]
        plan = interpolated_plan(len(sources), options.interpolate)
    if not sources:
        raise StageError(f"{spec.name}: the generate job produced no frames for a {options.kind}")
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise StageError(f"{spec.name}: generated image missing: {missing[0]}")

    canvas = _canvas_size(sources[0])
    frames_dir = ctx.work_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    total = len(plan)
    loaded: dict[int, Image.Image] = {}
    # a frame file for each recipe seen, for the frames that repeat it (a still hold)
    held: dict[FrameRecipe, Path] = {}
    for number, recipe in enumerate(plan):
        target = frames_dir / frame_name(number)
        if target.exists():  # written atomically by an earlier attempt: whole and right
            if recipe.second is None:
                held.setdefault(recipe, target)
            continue
        if ctx.should_stop():
            ctx.checkpoint({"frames_done": number, "frames_dir": str(frames_dir)})
            raise StageStopped(f"video {spec.name} stopped at frame {number}/{total}")
        ctx.fault("video.frame")
        if recipe.second is None and recipe in held:
            _link_or_copy(held[recipe], target)
        else:
            frame = _compose(recipe, sources, canvas, loaded, options)
            write_png(frame, target, compress_level=1)
            if recipe.second is None:
                held[recipe] = target
        ctx.progress(number + 1, total + 1, phase="frames")
        if (number + 1) % CHECKPOINT_EVERY == 0:
            ctx.checkpoint({"frames_done": number + 1, "frames_dir": str(frames_dir)})

    for extra in frames_dir.glob("*.png"):
        if extra.stem.isdigit() and int(extra.stem) >= total:
            extra.unlink()  # ffmpeg reads the numbered sequence to its end
    output = Path(spec.output)
    audio = None
    if options.audio is not None:
        if not Path(options.audio).is_file():
            raise StageError(f"{spec.name}: video.audio: {Path(options.audio).name} is missing")
        audio = AudioTrack(Path(options.audio), options.audio_fit)
    encode_frames(
        frames_dir, options.fps, options.format, output, encode_timeout(total), ctx.should_stop,
        audio,
    )  # fmt: skip
    ctx.progress(total + 1, total + 1, phase="encoded")
    ctx.artifact(output, "video")
    return {
        "video": str(output),
        "format": options.format,
        "kind": options.kind,
        "frames": total,
        "fps": options.fps,
        "width": canvas[0],
        "height": canvas[1],
        "duration": total / options.fps,
    }


def _link_or_copy(source: Path, target: Path) -> None:
    """A repeated frame costs a hard link, not another PNG encode (a copy where links fail)."""
    from dropkiln.stages.faults import take_torn_write

    torn = take_torn_write()
    if torn is not None:
        raise torn  # the frame's write: a link needs room in the directory too
    try:
        os.link(source, target)
    except OSError:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


def _canvas_size(first: Path) -> tuple[int, int]:
    # H.264 in yuv420p needs even sides
    with Image.open(first) as img:
        width, height = img.size
    width, height = width - width % 2, height - height % 2
    if width < 2 or height < 2:
        raise StageError(f"{first.name}: too small for a video ({width}x{height})")
    return width, height


def _compose(
    recipe: FrameRecipe,
    sources: list[Path],
    canvas: tuple[int, int],
    loaded: dict[int, Image.Image],
    options: VideoOptions,
) -> Image.Image:
    frame = _moved(_fitted(recipe.first, sources, canvas, loaded), recipe.first, recipe.shown,
                   options)  # fmt: skip
    if recipe.second is not None:
        # the next image comes in at the start of its own move
        following = _moved(_fitted(recipe.second, sources, canvas, loaded), recipe.second, 0.0,
                           options)  # fmt: skip
        frame = Image.blend(frame, following, recipe.mix)
    return frame


def _moved(picture: Image.Image, index: int, shown: float, options: VideoOptions) -> Image.Image:
    if options.motion != "ken-burns":
        return picture
    box = ken_burns_box(index, shown, options.zoom, picture.size)
    return picture.resize(picture.size, Image.Resampling.LANCZOS, box=box)


def _fitted(
    index: int, sources: list[Path], canvas: tuple[int, int], loaded: dict[int, Image.Image]
) -> Image.Image:
    """Source ``index`` letterboxed into the canvas; only the two latest stay in memory."""
    if index not in loaded:
        for old in [k for k in loaded if k < index - 1]:
            del loaded[old]
        with Image.open(sources[index]) as img:
            picture = img.convert("RGB")
        if picture.size != canvas:
            picture = ImageOps.contain(picture, canvas, Image.Resampling.LANCZOS)
            board = Image.new("RGB", canvas, (0, 0, 0))
            board.paste(
                picture, ((canvas[0] - picture.width) // 2, (canvas[1] - picture.height) // 2)
            )
            picture = board
        loaded[index] = picture
    return loaded[index]


STAGE = StageDef("video", "cpu", VideoSpec, run_video, priority=10, inputs=("image",))
