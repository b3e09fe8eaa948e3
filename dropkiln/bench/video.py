"""Video stage speed: a slideshow through the stage (frames on disk, resumable) against the
same frames composed in memory and piped straight to ffmpeg.

Run ``python -m dropkiln.bench.video [N_IMAGES] [SIZE] [FPS] [SECONDS_PER_IMAGE]``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dropkiln.stages.generation.prompt_file import VideoOptions
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.video import VideoSpec, run_video, slideshow_plan


def bench_video(
    images: int = 8, size: int = 512, fps: int = 12, seconds_per_image: float = 1.5,
    repeat: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Seconds for the stage and for an in-memory encode of the same slideshow; their ratio."""
    options = VideoOptions(fps=fps, seconds_per_image=seconds_per_image)
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        sources = _write_images(root / "images", images, size)
        stage, direct = [], []
        for attempt in range(repeat):
            spec = VideoSpec(name="b", options=options, output=str(root / f"stage-{attempt}.mp4"))
            ctx = LocalContext(
                root=root,
                work_dir=root / "work" / str(attempt),
                upstream_results={"generate": {"images": [str(p) for p in sources]}},
            )
            started = time.perf_counter()
            result = run_video(spec, ctx)
            stage.append(time.perf_counter() - started)
            started = time.perf_counter()
            _encode_in_memory(sources, options, root / f"direct-{attempt}.mp4")
            direct.append(time.perf_counter() - started)
    return {
        "images": images,
        "size": size,
        "frames": result["frames"],
        "fps": fps,
        "stage_s": round(min(stage), 3),
        "in_memory_s": round(min(direct), 3),
        "ratio": round(min(stage) / min(direct), 3),
        "stage_all": [round(value, 4) for value in stage],
        "in_memory_all": [round(value, 4) for value in direct],
        "stage_frames_per_s": round(result["frames"] / min(stage), 1),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def _write_images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for number in range(count):
        coarse = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"{number:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def _encode_in_memory(sources: list[Path], options: VideoOptions, target: Path) -> None:
    import imageio_ffmpeg

    pictures = []
    for path in sources:
        with Image.open(path) as img:
            pictures.append(img.convert("RGB"))
    writer = imageio_ffmpeg.write_frames(
        str(target), pictures[0].size, fps=options.fps, codec="libx264",
        pix_fmt_out="yuv420p", quality=None, output_params=["-crf", "18", "-preset", "medium"],
        macro_block_size=2,
    )  # fmt: skip
    writer.send(None)
    for recipe in slideshow_plan(len(pictures), options):
        frame = pictures[recipe.first]
        if recipe.second is not None:
            frame = Image.blend(frame, pictures[recipe.second], recipe.mix)
        writer.send(frame.tobytes())
    writer.close()


def main(argv: Sequence[str] = ()) -> None:
    numbers = [float(arg) for arg in argv]
    images = int(numbers[0]) if numbers else 8
    size = int(numbers[1]) if len(numbers) > 1 else 512
    fps = int(numbers[2]) if len(numbers) > 2 else 12
    seconds = numbers[3] if len(numbers) > 3 else 1.5
    figures = bench_video(images, size, fps, seconds)
    print(f"slideshow: {images} images of {size}x{size}, {figures['frames']} frames at {fps} fps")
    print(f"stage (frames to disk, then ffmpeg) {figures['stage_s']:.2f}s "
          f"({figures['stage_frames_per_s']} frames/s); in memory to ffmpeg "
          f"{figures['in_memory_s']:.2f}s; ratio {figures['ratio']:.2f}")  # fmt: skip
    print(f"load average after the runs: {figures['load_average_after']} on {os.cpu_count()} CPUs")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
