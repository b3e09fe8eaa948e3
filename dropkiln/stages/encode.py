"""Encoding a numbered frame sequence with the ffmpeg that imageio-ffmpeg ships."""

from __future__ import annotations

import subprocess
from pathlib import Path

from dropkiln.stages.base import StageError, atomic_path

FRAME_PATTERN = "%06d.png"

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


def encode_frames(frames_dir: Path, fps: int, video_format: str, target: Path) -> Path:
    """Encode ``frames_dir/000000.png …`` at ``fps`` into ``target``, atomically."""
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
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            detail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise StageError(f"ffmpeg could not encode the {video_format}: {detail[0]}")
    return target
