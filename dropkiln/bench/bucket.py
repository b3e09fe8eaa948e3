"""Bucket stage throughput: one decode worker against all cores, same images, same process.

Run ``python -m dropkiln.bench.bucket [N_IMAGES] [WIDTH] [HEIGHT]``.
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

from dropkiln.config import BucketSettings
from dropkiln.stages.bucket import BucketSpec, run_bucket
from dropkiln.stages.testing import LocalContext


def bench_bucket(
    n_images: int = 200,
    size: tuple[int, int] = (2048, 1536),
    workers: Sequence[int] | None = None,
    repeat: int = 2,
    resolution: int = 1024,
) -> dict[str, Any]:
    """Bucket ``n_images`` generated photo-like JPEGs with each worker count; images/s, speedup."""
    counts = list(workers) if workers is not None else [1, os.cpu_count() or 1]
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        dataset = Path(scratch, "dataset")
        generated_bytes = _write_dataset(dataset, n_images, size)
        seconds: dict[int, list[float]] = {count: [] for count in counts}
        manifests = set()
        # Interleaved (1, N, 1, N, …) so a change in machine load hits both alike.
        for attempt in range(repeat):
            for count in counts:
                work_dir = Path(scratch, f"work-{count}-{attempt}")
                ctx = LocalContext(root=Path(scratch), work_dir=work_dir)
                spec = BucketSpec(
                    dataset_dir=str(dataset),
                    name="bench",
                    bucket=BucketSettings(workers=count, resolution=resolution),
                )
                started = time.perf_counter()
                result = run_bucket(spec, ctx)
                seconds[count].append(time.perf_counter() - started)
                manifests.add(Path(result.manifest).read_bytes())
    rates = [n_images / min(seconds[count]) for count in counts]
    runs = [
        {
            "workers": count,
            "seconds": round(min(seconds[count]), 3),
            "seconds_all": [round(value, 3) for value in seconds[count]],
            "images_per_s": round(rate, 1),
        }
        for count, rate in zip(counts, rates, strict=True)
    ]
    return {
        "images": n_images,
        "size": list(size),
        "resolution": resolution,
        "dataset_mb": round(generated_bytes / 2**20, 1),
        "cpu_count": os.cpu_count(),
        "repeat": repeat,
        "runs": runs,
        "speedup": round(rates[-1] / rates[0], 2),
        "same_manifest": len(manifests) == 1,
        # Other work on the machine skews the ratio; the 1-minute load says how much there was.
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def _write_dataset(folder: Path, n_images: int, size: tuple[int, int]) -> int:
    """Photo-like JPEGs (smooth colour fields plus sensor noise), half of them portrait."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    side = max(size) + 64
    # One noise field, sampled at a different offset per image: cheap, and no two alike.
    noise = rng.normal(0, 6, (side, side, 3)).astype(np.float32)
    total = 0
    for index in range(n_images):
        width, height = size if index % 2 == 0 else size[::-1]
        coarse = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        top, left = (int(value) for value in rng.integers(0, 64, 2))
        grain = noise[top : top + height, left : left + width]
        pixels = np.clip(np.asarray(smooth, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        path = folder / f"photo_{index:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        path.with_suffix(".txt").write_text(f"photo {index}, generated, bench")
        total += path.stat().st_size
    return total


def main(argv: Sequence[str] = ()) -> None:
    numbers = [int(arg) for arg in argv]
    n_images = numbers[0] if numbers else 200
    size = (numbers[1], numbers[2]) if len(numbers) >= 3 else (2048, 1536)
    figures = bench_bucket(n_images=n_images, size=size)
    print(f"bucket stage: {n_images} JPEGs of {size[0]}x{size[1]} ({figures['dataset_mb']} MB)")
    print(f"{'workers':>8} {'seconds':>9} {'images/s':>9}")
    for run in figures["runs"]:
        print(f"{run['workers']:>8} {run['seconds']:>9.2f} {run['images_per_s']:>9.1f}")
    print(f"speedup {figures['speedup']:.2f}x, identical manifests: {figures['same_manifest']}")
    print(f"load average after the runs: {figures['load_average_after']} on {os.cpu_count()} CPUs")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
