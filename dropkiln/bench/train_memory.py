"""Training's memory on the device: one warm load across train → generate → train, and
device memory at two dataset sizes.

Each part runs in a fresh process of its own, so a peak reached earlier cannot hide a later
one. The jobs are the real stages (bucketed dataset, cache, train, generate) with
LocalContext. The memory watcher samples the process's RSS, which on the CPU is the
device's memory; on a GPU it also reports torch's CUDA peaks.

- **One load**: the warm cache's load counter after cache, train, generate and train again
  (one load means every job used the same copy), each job's peak, and how far the second
  train job's peak is above the first's, in units of the model's weights (a second copy
  would add one).
- **Dataset sizes**: a train job on N and on M images, everything else equal: its peak
  above its own start. Were the latents and text embeddings kept on the device, the peak
  would grow by the bytes of their shards (reported beside it); streamed, it does not.

Run ``python -m dropkiln.bench.train_memory [--device cpu] [--images 16 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 1024**2


def bench_train_memory(
    images: tuple[int, int] = (16, 256), size: int = 128, steps: int = 8, device: str = "cpu",
    model: str = "tiny-sdxl", models_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Both figures, each part in its own process."""
    common = ["--size", str(size), "--steps", str(steps), "--device", device, "--model", model]
    if models_dir is not None:
        common += ["--models-dir", str(models_dir)]
    load_before = os.getloadavg()[0]
    one_load = _part(["--part", "one-load", *common])
    sizes = [_part(["--part", "dataset", "--count", str(n), *common]) for n in images]
    small, large = sizes
    return {
        "device": device,
        "model": model,
        "size": size,
        "steps": steps,
        "one_load": one_load,
        "dataset_sizes": sizes,
        "dataset_growth": {
            "images": [small["images"], large["images"]],
            "shard_bytes_added": large["shard_bytes"] - small["shard_bytes"],
            "train_peak_rise_added": large["train_peak_rise_bytes"]
            - small["train_peak_rise_bytes"],
        },
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }


def _part(arguments: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "dropkiln.bench.train_memory", *arguments],
        check=True,
        capture_output=True,
        text=True,
    )
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def one_load(root: Path, size: int, steps: int, device: str, model: str) -> dict[str, Any]:
    """cache → train → generate → train in this process: loads, peaks, weights."""
    from diffusers import StableDiffusionXLPipeline  # noqa: F401 - imported before measuring

    from dropkiln.bench.memory import MemoryWatch
    from dropkiln.bench.train import cached_bench_dataset
    from dropkiln.stages.models import shared_pipelines

    cache = shared_pipelines()
    before_load = _rss()  # torch and diffusers imported; no model yet
    loads, peaks = {}, {}
    with MemoryWatch(device) as watch:
        cached = cached_bench_dataset(root, None, 8, size, model, device)
    loads["cache"], peaks["cache"] = cache.loads, watch.report()["rss_peak_bytes"]
    for job, run in (
        ("train", lambda: _train(root, cached, model, steps, device, "first")),
        ("generate", lambda: _generate(root, model, size, device)),
        ("train again", lambda: _train(root, cached, model, steps, device, "second")),
    ):
        with MemoryWatch(device) as watch:
            run()
        loads[job], peaks[job] = cache.loads, watch.report()["rss_peak_bytes"]
    weights = _warm_weights_bytes(device)
    # A second copy for the second train job would raise its peak by the weights' bytes.
    again = peaks["train again"] - peaks["train"]
    return {
        "loads_after": loads,
        "weights_bytes": weights,
        "rss_before_load_bytes": before_load,
        "rss_peak_bytes": peaks,
        "peak_above_before_load_bytes": max(peaks.values()) - before_load,
        "second_train_peak_minus_first_bytes": again,
        "second_train_peak_minus_first_in_weights": round(again / weights, 2) if weights else None,
    }


def dataset_size(
    root: Path, count: int, size: int, steps: int, device: str, model: str
) -> dict[str, Any]:
    """A train job on ``count`` images: its peak above its start, and its shards' bytes."""
    from dropkiln.bench.memory import MemoryWatch
    from dropkiln.bench.train import cached_bench_dataset
    from dropkiln.stages.cache import CacheIndex

    cached = cached_bench_dataset(root, None, count, size, model, device)
    index = CacheIndex.load(cached.index)
    refs = {image.latents for image in index.images} | {image.text for image in index.images}
    shard_bytes = sum((Path(index.cache_dir) / ref.shard).stat().st_size for ref in refs)
    # the model is warm and the first step's allocations made before the watch starts
    _train(root, cached, model, 1, device, "warm-up")
    with MemoryWatch(device) as watch:
        _train(root, cached, model, steps, device, "measured")
    report = watch.report()
    figures = {
        "images": count,
        "shard_bytes": shard_bytes,
        "train_start_rss_bytes": report["rss_start_bytes"],
        "train_peak_rss_bytes": report["rss_peak_bytes"],
        "train_peak_rise_bytes": report["rss_peak_bytes"] - report["rss_start_bytes"],
    }
    if "cuda_peak_allocated_bytes" in report:
        figures["cuda_peak_allocated_bytes"] = report["cuda_peak_allocated_bytes"]
    return figures


def _train(root: Path, cached: Any, model: str, steps: int, device: str, name: str) -> None:
    from dropkiln.config import TrainSettings
    from dropkiln.stages.testing import LocalContext
    from dropkiln.stages.train import TrainSpec, run_train

    options = TrainSettings(
        steps=steps, checkpoint_every=steps, batch_size=2, rank=8, validation_prompts=["a cat"]
    )
    out = root / "outputs" / "loras" / name
    spec = TrainSpec(name=name, model=model, options=options, output_dir=str(out))
    ctx = LocalContext(root=root, work_dir=root / "state" / "work" / f"train-{name}",
                       device=device, upstream_results={"cache": cached})  # fmt: skip
    run_train(spec, ctx)


def _generate(root: Path, model: str, size: int, device: str) -> None:
    from dropkiln.bench.generate import overhead_prompts
    from dropkiln.stages.generate import GenerateSpec, run_generate
    from dropkiln.stages.testing import LocalContext

    out = root / "outputs" / "images" / "memory"
    prompts = overhead_prompts(2, size, 4)
    spec = GenerateSpec(name="memory", model=model, prompt_file=prompts, output_dir=str(out))
    run_generate(spec, LocalContext(root=root, work_dir=root / "state" / "work" / "generate",
                                    device=device))  # fmt: skip


def _warm_weights_bytes(device: str) -> int:
    """Bytes of the warm pipelines' weights on ``device`` (the warm cache counts them)."""
    from dropkiln.stages.models import shared_pipelines

    cache = shared_pipelines()
    return cache.resident_bytes if device == "cpu" else cache.device_bytes(device)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _mib(value: int) -> str:
    return f"{value / MIB:.1f} MiB"


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.train_memory")
    parser.add_argument("--part", choices=["one-load", "dataset"])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--images", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--models-dir", type=Path)
    args = parser.parse_args(list(argv))
    if args.part is not None:
        with tempfile.TemporaryDirectory(prefix="dropkiln-bench-memory-") as scratch:
            root = Path(scratch)
            from dropkiln.bench.cache import link_models

            link_models(root, args.models_dir)
            if args.part == "one-load":
                part = one_load(root, args.size, args.steps, args.device, args.model)
            else:
                part = dataset_size(root, args.count, args.size, args.steps, args.device,
                                    args.model)  # fmt: skip
        print(json.dumps(part))
        return
    figures = bench_train_memory(tuple(args.images), args.size, args.steps, args.device,
                                 args.model, args.models_dir)  # fmt: skip
    load = figures["one_load"]
    print(f"loads after cache/train/generate/train: {list(load['loads_after'].values())}; "
          f"second train's peak {_mib(load['second_train_peak_minus_first_bytes'])} above the "
          f"first's (weights {_mib(load['weights_bytes'])}); highest peak "
          f"{_mib(load['peak_above_before_load_bytes'])} above torch imported")  # fmt: skip
    for row in figures["dataset_sizes"]:
        print(f"{row['images']} images ({_mib(row['shard_bytes'])} of shards): train peak "
              f"{_mib(row['train_peak_rise_bytes'])} above its start")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
