"""The video stage: slideshow plans, encoding to MP4/GIF/WebP, resuming after a failure."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dropkiln.stages.base import StageError, StageStopped
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.generation.prompt_file import VideoOptions
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.video import (
    STAGE,
    FrameRecipe,
    VideoSpec,
    run_video,
    slideshow_plan,
    video_path,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def make_images(folder: Path, size: tuple[int, int] = (64, 48), count: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        path = folder / f"{number:03d}.png"
        Image.new("RGB", size, COLOURS[number % 3]).save(path)
        paths.append(str(path))
    return paths


def decode(video: str | Path) -> tuple[dict, list[np.ndarray]]:
    """Every frame of a video decoded by imageio's ffmpeg, with codec, size, fps, duration."""
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(video),
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, check=True)
    stream = re.search(
        rb"Video: (\w+).*?, (yuv\w+|rgb\w+).*?, (\d+)x(\d+).*?, ([\d.]+) fps", done.stderr
    )
    assert stream is not None, done.stderr.decode()
    codec, pix_fmt, width, height, fps = stream.groups()
    size = (int(width), int(height))
    raw = np.frombuffer(done.stdout, np.uint8).reshape(-1, size[1], size[0], 3)
    count, seconds = imageio_ffmpeg.count_frames_and_secs(str(video))
    assert count == len(raw)
    meta = {"codec": codec.decode(), "pix_fmt": pix_fmt.decode(), "size": size,
            "fps": float(fps), "duration": seconds}  # fmt: skip
    return meta, list(raw)


def context(tmp_path: Path, upstream: dict, **options: object) -> LocalContext:
    return LocalContext(
        root=tmp_path,
        work_dir=tmp_path / "work",
        upstream_results={"generate": upstream},
        **options,
    )  # type: ignore[arg-type]


def spec_for(tmp_path: Path, **options: object) -> VideoSpec:
    video = VideoOptions(**options)  # type: ignore[arg-type]
    return VideoSpec(name="s", options=video, output=str(tmp_path / f"out/s.{video.format}"))


def test_stage_definition() -> None:
    assert (STAGE.name, STAGE.lane, STAGE.spec, STAGE.priority) == ("video", "cpu", VideoSpec, 10)
    gif = VideoOptions(format="gif")
    assert video_path(Path("/r/outputs/videos"), "cats", gif) == Path("/r/outputs/videos/cats.gif")


def test_slideshow_plan_cut_and_crossfade() -> None:
    cut = slideshow_plan(3, VideoOptions(fps=4, seconds_per_image=1.0, transition="cut"))
    assert cut == [FrameRecipe(i // 4) for i in range(12)]
    fade = slideshow_plan(2, VideoOptions(fps=4, seconds_per_image=1.0, transition="crossfade"))
    # four frames an image; the last two of the first fade into the second (2 = 0.5 s × 4 fps)
    assert fade[:2] == [FrameRecipe(0), FrameRecipe(0)]
    assert [(f.first, f.second) for f in fade[2:4]] == [(0, 1), (0, 1)]
    assert [round(f.mix, 3) for f in fade[2:4]] == [0.333, 0.667]
    assert fade[4:] == [FrameRecipe(1)] * 4


def test_mp4_frames_size_and_duration(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images")
    spec = spec_for(tmp_path, fps=10, seconds_per_image=1.0)
    ctx = context(tmp_path, {"images": images})
    result = run_video(spec, ctx)
    output = Path(spec.output)
    assert result["frames"] == 30 and result["duration"] == 3.0
    assert ctx.artifacts == [(output, "video")]
    meta, frames = decode(output)
    assert (len(frames), meta["size"], meta["fps"], meta["duration"]) == (30, (64, 48), 10.0, 3.0)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    middle = frames[5]
    assert middle[24, 32, 0] > 200 and middle[24, 32, 1] < 60  # still the red image


@pytest.mark.parametrize("video_format", ["gif", "webp"])
def test_gif_and_webp(tmp_path: Path, video_format: str) -> None:
    images = make_images(tmp_path / "images", count=2)
    spec = spec_for(tmp_path, fps=10, seconds_per_image=1.0, format=video_format)
    run_video(spec, context(tmp_path, {"images": images}))
    with Image.open(spec.output) as animation:
        assert animation.size == (64, 48)
        total_ms = 0
        for index in range(animation.n_frames):
            animation.seek(index)
            animation.load()
            total_ms += animation.info["duration"]
        # GIF keeps every frame; animated WebP merges identical neighbours, so count time
        assert total_ms == 2000
        if video_format == "gif":
            assert animation.n_frames == 20


def test_odd_sized_and_mixed_images_are_letterboxed(tmp_path: Path) -> None:
    first = make_images(tmp_path / "a", size=(65, 51), count=1)
    second = make_images(tmp_path / "b", size=(30, 60), count=1)
    spec = spec_for(tmp_path, fps=2, seconds_per_image=1.0, transition="cut")
    result = run_video(spec, context(tmp_path, {"images": first + second}))
    assert (result["width"], result["height"]) == (64, 50)
    meta, frames = decode(spec.output)
    assert meta["size"] == (64, 50) and len(frames) == 4


def test_latent_walk_frames_are_encoded_one_to_one(tmp_path: Path) -> None:
    frames = make_images(tmp_path / "walk", count=3)
    spec = spec_for(tmp_path, kind="latent-walk", fps=6, frames=3)
    result = run_video(spec, context(tmp_path, {"images": [], "walk_frames": frames}))
    assert result["frames"] == 3 and result["kind"] == "latent-walk"
    assert len(decode(spec.output)[1]) == 3


def test_a_retry_continues_with_the_frames_already_written(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images")
    spec = spec_for(tmp_path, fps=10, seconds_per_image=1.0)
    ctx = context(tmp_path, {"images": images}, faults=FaultInjector("enospc@video.frame:25"))
    with pytest.raises(OSError):
        run_video(spec, ctx)
    frames = sorted((tmp_path / "work" / "frames").glob("*.png"))
    assert len(frames) == 24
    assert ctx.checkpoints[-1]["frames_done"] == 24
    written = {path: path.stat().st_mtime_ns for path in frames}
    ctx.progress_log.clear()
    result = run_video(spec, ctx)
    assert result["frames"] == 30
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in written.items())
    # only the six missing frames were made again, then the encode
    assert [done for done, _, metrics in ctx.progress_log if metrics["phase"] == "frames"] == [
        25,
        26,
        27,
        28,
        29,
        30,
    ]


def test_stop_checkpoints_and_leaves_no_video(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images")
    spec = spec_for(tmp_path, fps=10, seconds_per_image=1.0)
    ctx = context(tmp_path, {"images": images}, stop_after=5)
    with pytest.raises(StageStopped):
        run_video(spec, ctx)
    assert ctx.saved == {"frames_done": 4, "frames_dir": str(tmp_path / "work" / "frames")}
    assert not Path(spec.output).exists()


def test_missing_inputs_are_stage_errors(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    with pytest.raises(StageError, match="no frames"):
        run_video(spec, context(tmp_path, {"images": []}))
    with pytest.raises(StageError, match="missing"):
        run_video(spec, context(tmp_path, {"images": [str(tmp_path / "gone.png")]}))


def _hanging_frames(folder: Path) -> Path:
    """A frame that is a FIFO nobody writes: ffmpeg blocks on it for ever, as a hung
    encoder would."""
    import os

    folder.mkdir()
    os.mkfifo(folder / "000000.png")
    return folder


def test_defect13_a_hung_ffmpeg_is_killed_after_its_timeout(tmp_path: Path) -> None:
    import time

    from dropkiln.stages.encode import encode_frames

    frames = _hanging_frames(tmp_path / "frames")
    started = time.monotonic()
    with pytest.raises(StageError, match="ffmpeg did not finish the mp4 within 1 s"):
        encode_frames(frames, 4, "mp4", tmp_path / "out.mp4", timeout_s=1.0)
    assert time.monotonic() - started < 5
    assert not (tmp_path / "out.mp4").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]  # no temp file left


def test_defect13_a_stop_request_kills_a_running_ffmpeg(tmp_path: Path) -> None:
    from dropkiln.stages.encode import encode_frames

    frames = _hanging_frames(tmp_path / "frames")
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(StageStopped, match="frames are kept"):
        encode_frames(frames, 4, "mp4", tmp_path / "out.mp4", timeout_s=60, should_stop=stop)
