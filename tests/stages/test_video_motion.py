"""Ken Burns pan and zoom in slideshows, and the MP4's index placed first (faststart)."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_video import context, decode, spec_for

from dropkiln.stages.video import run_video, slideshow_plan


def gradient_images(folder: Path, count: int = 2, size: tuple[int, int] = (64, 48)) -> list[str]:
    """Images with detail everywhere, so a pan or zoom shows in every pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 255, size[0])[None, :, None]
    y = np.linspace(0, 255, size[1])[:, None, None]
    paths = []
    for number in range(count):
        rgb = np.concatenate([np.broadcast_to(x, (*size[::-1], 1)),
                              np.broadcast_to(y, (*size[::-1], 1)),
                              np.full((*size[::-1], 1), 80.0 * number)], axis=-1)  # fmt: skip
        path = folder / f"{number:03d}.png"
        Image.fromarray(rgb.astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def top_level_boxes(path: Path) -> list[str]:
    """The MP4's top-level box types in file order (ISO/IEC 14496-12: 32-bit size, type)."""
    data = path.read_bytes()
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return boxes


def test_ken_burns_plan_moves_through_each_hold() -> None:
    plan = slideshow_plan(2, spec_for(Path("."), fps=4, seconds_per_image=1.0, transition="cut",
                                      motion="ken-burns").options)  # fmt: skip
    assert [round(r.shown, 3) for r in plan] == [0, 0.333, 0.667, 1.0] * 2
    still = slideshow_plan(2, spec_for(Path("."), fps=4, seconds_per_image=1.0).options)
    assert {r.shown for r in still} == {0.0}


def test_ken_burns_frames_zoom_and_pan_into_the_image(tmp_path: Path) -> None:
    images = gradient_images(tmp_path / "images")
    spec = spec_for(tmp_path, fps=5, seconds_per_image=1.0, transition="cut", motion="ken-burns",
                    zoom=2.0)  # fmt: skip
    run_video(spec, context(tmp_path, {"images": images}))
    frames = [np.asarray(Image.open(p).convert("RGB")).astype(int)
              for p in sorted((tmp_path / "work" / "frames").glob("*.png"))]  # fmt: skip
    assert len(frames) == 10
    with Image.open(images[0]) as first:
        whole = np.asarray(first.convert("RGB")).astype(int)
        # the end of the first hold: half the width and height, against the right edge
        end = first.convert("RGB").crop((32, 12, 64, 36)).resize((64, 48), Image.Resampling.LANCZOS)
    assert np.abs(frames[0] - whole).max() <= 1
    assert np.abs(frames[4] - np.asarray(end).astype(int)).mean() < 2
    # every frame of a hold is new (no still frames), and the second image pans the other way
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(frames[:5]))
    assert frames[9][:, :, 0].mean() < frames[5][:, :, 0].mean()  # drifts to the darker left
    assert frames[4][:, :, 0].mean() > frames[0][:, :, 0].mean()  # drifts to the brighter right


def test_mp4_is_h264_yuv420p_with_the_index_before_the_media(tmp_path: Path) -> None:
    images = gradient_images(tmp_path / "images")
    spec = spec_for(tmp_path, fps=5, seconds_per_image=1.0, motion="ken-burns")
    run_video(spec, context(tmp_path, {"images": images}))
    meta, frames = decode(spec.output)
    assert (meta["codec"], meta["pix_fmt"], len(frames)) == ("h264", "yuv420p", 10)
    boxes = top_level_boxes(Path(spec.output))
    assert boxes.index("moov") < boxes.index("mdat"), boxes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[video]\nmotion = "zoom"\n[[image]]\nprompt = "a"\n', "video.motion:"),
        ('[video]\nzoom = 0.5\n[[image]]\nprompt = "a"\n', "video.zoom:"),
        ('[video]\nzoom = 9\n[[image]]\nprompt = "a"\n', "video.zoom:"),
        ('[video]\ninterpolate = 16\n[[image]]\nprompt = "a"\n', "video.interpolate:"),
        ('[video]\ninterpolate = -1\n[[image]]\nprompt = "a"\n', "video.interpolate:"),
    ],
)
def test_bad_motion_settings_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    from dropkiln.config import Settings
    from dropkiln.stages.base import StageError
    from dropkiln.stages.generation.prompt_loading import load_prompt_file

    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(StageError, match=expected):
        load_prompt_file(tmp_path / "bad.toml", Settings(root=tmp_path).generate)


def write_tone(path: Path, seconds: float, rate: int = 16_000) -> None:
    """A 440 Hz sine as 16-bit mono WAV."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 12_000).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())


def streams(video: Path) -> tuple[str, float]:
    """ffmpeg's own description of the file's streams, and its duration in seconds."""
    import re
    import subprocess

    import imageio_ffmpeg

    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(video)],
                          capture_output=True, text=True)  # fmt: skip
    found = re.search(r"Duration: (\d+):(\d+):([\d.]+)", done.stderr)
    assert found is not None, done.stderr
    hours, minutes, seconds = found.groups()
    return done.stderr, int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@pytest.mark.parametrize(("fit", "tone_s", "expected_s"), [("cut", 1.0, 1.0), ("loop", 0.7, 4.0)])
def test_an_audio_track_cuts_the_video_or_loops(
    tmp_path: Path, fit: str, tone_s: float, expected_s: float
) -> None:
    images = gradient_images(tmp_path / "images")
    write_tone(tmp_path / "tone.wav", tone_s)
    spec = spec_for(tmp_path, fps=5, seconds_per_image=2.0, audio=str(tmp_path / "tone.wav"),
                    audio_fit=fit)  # fmt: skip
    run_video(spec, context(tmp_path, {"images": images}))
    described, duration = streams(Path(spec.output))
    assert "Audio: aac" in described and "Video: h264" in described
    assert abs(duration - expected_s) <= 0.25, (duration, described)
    boxes = top_level_boxes(Path(spec.output))
    assert boxes.index("moov") < boxes.index("mdat")


@pytest.mark.parametrize(
    ("video", "expected"),
    [
        ('audio = "tone.wav"\nformat = "gif"', "video.audio: only an mp4 has sound"),
        ('audio = "../tone.wav"', "video.audio: '../tone.wav' leaves"),
        ('audio = "none.wav"', "video.audio: 'none.wav' does not exist"),
        ('audio = "tone.wav"\naudio_fit = "stretch"', "video.audio_fit:"),
    ],
)
def test_bad_audio_settings_name_the_field(tmp_path: Path, video: str, expected: str) -> None:
    from dropkiln.config import Settings
    from dropkiln.stages.base import StageError
    from dropkiln.stages.generation.prompt_loading import load_prompt_file

    folder = tmp_path / "drop"
    folder.mkdir()
    write_tone(folder / "tone.wav", 0.2)
    write_tone(tmp_path / "tone.wav", 0.2)
    (folder / "bad.toml").write_text(f'[video]\n{video}\n[[image]]\nprompt = "a"\n')
    with pytest.raises(StageError, match=expected):
        load_prompt_file(folder / "bad.toml", Settings(root=tmp_path).generate)


def test_latent_walk_frames_are_interpolated_by_blending(tmp_path: Path) -> None:
    from dropkiln.stages.video import FrameRecipe, interpolated_plan

    assert interpolated_plan(3, 1) == [
        FrameRecipe(0), FrameRecipe(0, 1, 0.5), FrameRecipe(1), FrameRecipe(1, 2, 0.5),
        FrameRecipe(2),
    ]  # fmt: skip
    walk = gradient_images(tmp_path / "walk", count=2)
    spec = spec_for(tmp_path, kind="latent-walk", fps=8, interpolate=3)
    result = run_video(spec, context(tmp_path, {"walk_frames": walk}))
    assert (result["frames"], result["duration"]) == (5, 5 / 8)
    frames = [np.asarray(Image.open(p).convert("RGB")).astype(float)
              for p in sorted((tmp_path / "work" / "frames").glob("*.png"))]  # fmt: skip
    ends = [np.asarray(Image.open(p).convert("RGB")).astype(float) for p in walk]
    # the middle frame is the half-way blend of the two rendered ones (Pillow rounds)
    assert np.abs(frames[2] - (ends[0] + ends[1]) / 2).max() <= 1
    assert np.array_equal(frames[0], ends[0]) and np.array_equal(frames[4], ends[1])
    _, decoded = decode(spec.output)
    assert len(decoded) == 5
