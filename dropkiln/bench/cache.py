"""Cache stage throughput, and re-caching a dataset with one image changed vs from scratch.

Run ``python -m dropkiln.bench.cache [N_IMAGES] [SIZE]`` (defaults: 200 images of 64x64).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dropkiln.bench.profile import Profiler
from dropkiln.bench.stats import intervals
from dropkiln.options import BucketSettings
from dropkiln.stages.base import write_atomic
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.bucket_manifest import BucketManifest, ManifestImage, ManifestSettings
from dropkiln.stages.cache import CacheResult, CacheSpec, run_cache
from dropkiln.stages.testing import LocalContext


def write_bench_dataset(root: Path, name: str, n_images: int, size: int) -> Path:
    """Square noisy-gradient PNGs already at their bucket size, and a bucket manifest."""
    folder = root / "drop" / "datasets" / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(n_images):
        _write_image(folder / f"img_{index:04d}.png", rng, size)
        (folder / f"img_{index:04d}.txt").write_text(f"photo {index % 7}, bench, tag {index % 3}")
    return write_bench_manifest(root, name, size)


def write_bench_manifest(root: Path, name: str, size: int) -> Path:
    """The manifest the bucket stage would write for the dataset folder (no resize, no crop)."""
    folder = root / "drop" / "datasets" / name
    images = [
        ManifestImage(
            path=path.name,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            caption=path.with_suffix(".txt").read_text(),
            original_size=(size, size),
            resized_size=(size, size),
            bucket=(size, size),
            crop_box=(0, 0, size, size),
            crop_left=0,
            crop_top=0,
            source_format="PNG",
            source_mode="RGB",
        )
        for path in sorted(folder.glob("*.png"))
    ]
    manifest = BucketManifest(
        name=name,
        dataset_dir=str(folder),
        settings=ManifestSettings.of(BucketSettings(resolution=max(size, 64)), seed=1),
        images=images,
        rejected=[],
        buckets={f"{size}x{size}": len(images)},
    )
    target = root / "state" / "work" / f"{name}-bucket" / "manifest.json"
    return write_atomic(target, manifest.model_dump_json())


def link_models(root: Path, models_dir: Path | None) -> None:
    """Use an existing models folder (tiny models already built) as ROOT/state/models."""
    if models_dir is not None:
        Path(models_dir).mkdir(parents=True, exist_ok=True)  # a first run builds them there
        (root / "state").mkdir(parents=True, exist_ok=True)
        (root / "state" / "models").symlink_to(Path(models_dir).resolve(), target_is_directory=True)


def _write_image(path: Path, rng: np.random.Generator, size: int) -> None:
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 8, (size, size, 3))
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path)


def bench_cache(
    n_images: int = 200,
    size: int = 64,
    model: str = "tiny-sdxl",
    repeat: int = 2,
    models_dir: Path | None = None,
    vae_batch_size: int = 8,
    device: str = "cpu",
    vae_batch_sizes: Sequence[int] = (),
    profiler: Profiler | None = None,
) -> dict[str, Any]:
    """Seconds to cache ``n_images`` from scratch, and to re-cache after one image changed;
    images/s for each of ``vae_batch_sizes``."""
    from dropkiln.stages.models import resolve_model, shared_pipelines
    from dropkiln.stages.models.encoding import compute_dtype

    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        link_models(root, models_dir)
        manifest = write_bench_dataset(root, "bench", n_images, size)
        started = time.perf_counter()
        ref = resolve_model(model, root / "state" / "models")
        shared_pipelines().get(ref, device, compute_dtype(device))
        warm_up_s = time.perf_counter() - started
        run = _CacheRun(root, model, device)
        scratch_s: list[float] = []
        recache_s: list[float] = []
        batch_s: list[float] = []
        counts: list[tuple[int, int]] = []
        rng = np.random.default_rng(1)
        # Interleaved (scratch, one changed, scratch, …) so machine load hits both alike.
        for _ in range(repeat):
            result, seconds, batches = run.from_scratch(manifest, vae_batch_size)
            scratch_s.append(seconds)
            batch_s += batches
            _write_image(root / "drop" / "datasets" / "bench" / "img_0000.png", rng, size)
            manifest = write_bench_manifest(root, "bench", size)
            result, seconds, _ = run.timed(manifest, vae_batch_size)
            recache_s.append(seconds)
            counts.append((result.encoded, result.reused))
        sweep = []
        for batch in vae_batch_sizes:
            runs = [run.from_scratch(manifest, batch) for _ in range(repeat)]
            best = min(seconds for _, seconds, _ in runs)
            sweep.append(
                {
                    "vae_batch_size": batch,
                    "seconds_all": [round(seconds, 4) for _, seconds, _ in runs],
                    "images_per_s": round(n_images / best, 2),
                    "batch_s": [s for _, _, batches in runs for s in batches],
                }
            )
        profile = None
        if profiler is not None:
            profile = profiler(lambda: run.from_scratch(manifest, vae_batch_size))
    best_scratch, best_recache = min(scratch_s), min(recache_s)
    figures: dict[str, Any] = {
        "images": n_images,
        "size": [size, size],
        "model": model,
        "device": device,
        "vae_batch_size": vae_batch_size,
        "threads": _threads(),
        "warm_up_s": round(warm_up_s, 3),
        "from_scratch_s": round(best_scratch, 3),
        "from_scratch_all": [round(s, 3) for s in scratch_s],
        "images_per_s": round(n_images / best_scratch, 1),
        "one_changed_s": round(best_recache, 3),
        "one_changed_all": [round(s, 3) for s in recache_s],
        "one_changed_encoded_reused": counts[-1],
        "one_changed_ratio": round(best_recache / best_scratch, 4),
        "vae_batch_s": batch_s,
        "sweep": sweep,
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    if profile is not None:
        figures["profile"] = profile
    return figures


@dataclass
class _StampedContext(LocalContext):
    """Records when each progress report arrives and how many items were done by then."""

    stamps: list[tuple[float, int]] = field(default_factory=list)

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        self.stamps.append((time.perf_counter(), done))
        super().progress(done, total, **metrics)


@dataclass(frozen=True)
class _CacheRun:
    root: Path
    model: str
    device: str

    def from_scratch(
        self, manifest: Path, vae_batch_size: int
    ) -> tuple[CacheResult, float, list[float]]:
        shutil.rmtree(self.root / "state" / "cache", ignore_errors=True)
        return self.timed(manifest, vae_batch_size)

    def timed(self, manifest: Path, vae_batch_size: int) -> tuple[CacheResult, float, list[float]]:
        """(result, seconds, seconds per VAE batch) of one cache run."""
        ctx = _StampedContext(
            root=self.root,
            work_dir=self.root / "state" / "work" / "bench-cache",
            device=self.device,
            upstream_results={"bucket": BucketResult.of(manifest)},
        )
        spec = CacheSpec(name="bench", model=self.model, vae_batch_size=vae_batch_size)
        started = time.perf_counter()
        result = run_cache(spec, ctx)
        elapsed = time.perf_counter() - started
        # progress(0) comes first, then one report per VAE batch, then per text batch
        image_stamps = [at for at, done in ctx.stamps if done <= result.encoded]
        return result, elapsed, intervals(image_stamps)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def main(argv: Sequence[str] = ()) -> None:
    import torch

    numbers = [int(arg) for arg in argv]
    n_images = numbers[0] if numbers else 200
    size = numbers[1] if len(numbers) > 1 else 64
    torch.set_num_threads(int(os.environ.get("DROPKILN_BENCH_THREADS", "1")))
    figures = bench_cache(n_images=n_images, size=size)
    print(f"cache stage: {n_images} images of {size}x{size}, {figures['model']}")
    print(
        f"from scratch  {figures['from_scratch_s']:>8.2f} s  {figures['images_per_s']:>7.1f} img/s"
    )
    encoded, reused = figures["one_changed_encoded_reused"]
    print(
        f"one changed   {figures['one_changed_s']:>8.2f} s  ({encoded} encoded, {reused} reused)"
        f" = {100 * figures['one_changed_ratio']:.1f}% of from scratch"
    )
    print(f"load average after the runs: {figures['load_average_after']} on {os.cpu_count()} CPUs")
    print(json.dumps({k: v for k, v in figures.items() if k != "vae_batch_s"}))


if __name__ == "__main__":
    main(sys.argv[1:])
