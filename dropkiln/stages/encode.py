"""Encoding a numbered frame sequence with the ffmpeg that imageio-ffmpeg ships."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from dropkiln.stages.base import StageError, StageStopped, atomic_path

FRAME_PATTERN = "%06d.png"
POLL_S = 0.25
"""How often a running encode looks for a stop request."""


def encode_timeout(frames: int) -> float:
    """Seconds an encode of ``frames`` frames may take before it counts as hung: a minute,
    plus a second a frame (libx264 "medium" does tens of 1080p frames a second on a CPU)."""
    return 60.0 + frames


# H.264 in yuv420p is what every browser and phone plays; +faststart puts the index first
# so it streams. The palette pass keeps GIF colours from banding.
CODEC_ARGS: dict[str, list[str]] = {
    "mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-preset", "medium",
            "-movflags", "+faststart", "-f", "mp4"],
    "gif": ["-filter_complex", "[0:v]split[a][b];[a]palettegen[p];[b][p]paletteuse",
            "-loop", "0", "-f", "gif"],
    "webp": ["-c:v", "libwebp_anim", "-lossless", "0", "-quality", "85", "-loop", "0",
             "-f", "webp"],
}  # fmt: skip


def frame_name(index: int) -> str:
    return FRAME_PATTERN % index


def ffmpeg_exe() -> str:
    """The ffmpeg binary bundled with imageio-ffmpeg (no system ffmpeg needed)."""
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def encode_frames(
    frames_dir: Path,
    fps: int,
    video_format: str,
    target: Path,
    timeout_s: float = 600.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> Path:
    """Encode ``frames_dir/000000.png …`` at ``fps`` into ``target``, atomically.

    Bounded: ffmpeg is killed after ``timeout_s`` (StageError), or at once when
    ``should_stop`` turns true (StageStopped; the frames stay, a rerun encodes again), so a
    hung ffmpeg can hold neither the job nor a daemon shutdown."""
    with atomic_path(target) as tmp:
        command = [
            ffmpeg_exe(),
            "-hide_banner",
            "-loglevel", "error",
            "-nostdin",
            "-y",
            "-framerate", str(fps),
            "-i", str(frames_dir / FRAME_PATTERN),
            *CODEC_ARGS[video_format],
            str(tmp),
        ]  # fmt: skip
        returncode, stderr = _run_bounded(command, timeout_s, should_stop, video_format)
        if returncode != 0:
            detail = stderr.strip().splitlines()[-1:] or ["no output"]
            raise StageError(f"ffmpeg could not encode the {video_format}: {detail[0]}")
    return target


def _run_bounded(
    command: list[str], timeout_s: float, should_stop: Callable[[], bool], what: str
) -> tuple[int, str]:
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        while True:
            try:
                _, stderr = process.communicate(timeout=POLL_S)
                return process.returncode, stderr
            except subprocess.TimeoutExpired:
                pass
            if should_stop():
                process.kill()
                process.communicate()
                raise StageStopped(f"encoding the {what} stopped (the frames are kept)")
            if time.monotonic() > deadline:
                process.kill()
                process.communicate()
                raise StageError(f"ffmpeg did not finish the {what} within {timeout_s:g} s")
