"""Generate stage speed: overhead against direct diffusers calls (with time per phase and a
sweep of images per call), and a warm model against one process per prompt file.

Run ``python -m dropkiln.bench.generate [--images N] [--size PX] [--steps N] [--files N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropkiln.bench.cache import link_models
from dropkiln.bench.phases import (
    GENERATION_PHASES,
    PhaseTimeline,
    generation_phase_rows,
    phase_summary,
    watch_pipeline,
)
from dropkiln.bench.profile import Profiler
from dropkiln.bench.stats import intervals
from dropkiln.config import Settings
from dropkiln.stages.generate import GenerateSpec, run_generate
from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile
from dropkiln.stages.generation.prompt_loading import load_prompt_file
from dropkiln.stages.testing import LocalContext

# What a script-per-job setup runs for every prompt file: load, generate, save, exit.
SCRIPT = """
import sys, torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
torch.set_num_threads(int(sys.argv[4]))
folder, out, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
for number, prompt in enumerate(sys.argv[6:]):
    image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=5.0, width=size,
                 height=size, generator=torch.Generator().manual_seed(1 + number)).images[0]
    image.save(f"{out}/{number:03d}.png")
"""


@dataclass
class _ImageClock(LocalContext):
    """Marks the timeline each time the stage writes an image."""

    timeline: PhaseTimeline = field(default_factory=PhaseTimeline)

    def artifact(self, path: Path, kind: str) -> None:
        super().artifact(path, kind)
        if kind == "image":
            self.timeline.mark()


def overhead_prompts(images: int, size: int, steps: int) -> PromptFile:
    """``images`` different prompts, one image each, seeds 1…N."""
    return PromptFile(
        images=[
            ImageEntry(prompt=f"a lighthouse, study {n}", seed=1 + n, steps=steps, width=size,
                       height=size)
            for n in range(images)
        ]
    )  # fmt: skip


def direct_images(pipe: Any, entries: Sequence[ImageEntry], per_call: int = 1) -> list[Any]:
    """The entries' images from bare pipeline calls (a fresh Euler scheduler each)."""
    import torch
    from diffusers import EulerDiscreteScheduler

    original = pipe.scheduler
    images = []
    try:
        for entry in entries:
            pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
            images += pipe(prompt=entry.prompt, num_inference_steps=entry.steps,
                           guidance_scale=entry.guidance, width=entry.width, height=entry.height,
                           num_images_per_prompt=per_call,
                           generator=torch.Generator().manual_seed(entry.seed)).images  # fmt: skip
    finally:
        pipe.scheduler = original
    return images


def bench_stage_overhead(
    root: Path, images: int, size: int, steps: int, repeat: int, model: str = "tiny-sdxl",
    device: str = "cpu", per_call: Sequence[int] = (), profiler: Profiler | None = None,
    warmup: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """The stage (PNG chunks, resume checks, contact sheet) against bare pipeline calls."""
    import numpy as np
    from PIL import Image

    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.models import resolve_model, shared_pipelines

    prompt_file = overhead_prompts(images, size, steps)
    ref = resolve_model(model, root / "state" / "models")
    pipe = shared_pipelines().get(ref, device, inference_dtype(device))
    stage_rows: list[dict[str, float]] = []
    direct_rows: list[dict[str, float]] = []
    stage_image_s: list[float] = []
    direct_image_s: list[float] = []

    def through_stage(attempt: int) -> float:
        out = root / "outputs" / "images" / f"stage-{attempt}"
        spec = GenerateSpec(name="b", model=model, prompt_file=prompt_file, output_dir=str(out))
        ctx = _ImageClock(root=root, work_dir=root / "state" / "work" / str(attempt),
                          device=device, timeline=PhaseTimeline(device))  # fmt: skip
        watch_pipeline(ctx.timeline, pipe)
        started = time.perf_counter()
        ctx.timeline.mark()
        try:
            run_generate(spec, ctx)
        finally:
            ctx.timeline.remove()
        elapsed = time.perf_counter() - started
        if attempt >= 0:
            stage_rows.extend(generation_phase_rows(ctx.timeline))
            stage_image_s.extend(intervals(ctx.timeline.marks))
        return elapsed

    def direct(attempt: int, save: bool) -> float:
        out = root / "outputs" / "direct" / f"{attempt}-{save}"
        out.mkdir(parents=True, exist_ok=True)
        timeline = PhaseTimeline(device)
        watch_pipeline(timeline, pipe)
        started = time.perf_counter()
        timeline.mark()
        try:
            for entry in prompt_file.images:
                (image,) = direct_images(pipe, [entry])
                if save:
                    image.save(out / f"{entry.seed}.png")
                timeline.mark()
        finally:
            timeline.remove()
        if not save:
            direct_rows.extend(generation_phase_rows(timeline))
            direct_image_s.extend(intervals(timeline.marks))
        return time.perf_counter() - started

    for _ in range(warmup):
        through_stage(-1)  # first-call costs belong to neither side
    stage, bare, saved = [], [], []
    # Interleaved so a change in machine load hits all three alike.
    for attempt in range(repeat):
        stage.append(through_stage(attempt))
        bare.append(direct(attempt, save=False))
        saved.append(direct(attempt, save=True))
    first = prompt_file.images[0]
    stage_png = root / "outputs" / "images" / "stage-0" / f"000-{first.seed}.png"
    (reference,) = direct_images(pipe, [first])
    with Image.open(stage_png) as written:
        same = bool(np.array_equal(np.asarray(written.convert("RGB")), np.asarray(reference)))
    figures: dict[str, Any] = {
        "images": images,
        "size": size,
        "steps": steps,
        "repeat": repeat,
        "warmup": warmup,
        "model": model,
        "device": device,
        "dtype": str(inference_dtype(device)).removeprefix("torch."),
        "stage_s": round(min(stage), 3),
        "direct_s": round(min(bare), 3),
        "direct_with_png_save_s": round(min(saved), 3),
        "ratio_vs_direct": round(min(stage) / min(bare), 3),
        "ratio_vs_direct_with_save": round(min(stage) / min(saved), 3),
        "same_images": same,
        "all_s": {"stage": _rounded(stage), "direct": _rounded(bare), "saved": _rounded(saved)},
        "stage_image_s": stage_image_s,
        "direct_image_s": direct_image_s,
        "stage_phases": phase_summary(stage_rows, GENERATION_PHASES),
        "direct_phases": phase_summary(direct_rows, GENERATION_PHASES),
        "per_call": [_per_call(pipe, first, count, repeat) for count in per_call],
    }
    if profiler is not None:
        figures["profile"] = profiler(lambda: through_stage(-2))
    return figures


def _per_call(pipe: Any, entry: ImageEntry, count: int, repeat: int) -> dict[str, Any]:
    """Images per second when one pipeline call makes ``count`` images."""
    direct_images(pipe, [entry], count)  # warm-up at this batch size
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        direct_images(pipe, [entry], count)
        seconds.append(time.perf_counter() - started)
    return {
        "images_per_call": count,
        "call_s": seconds,
        "images_per_s": round(count / min(seconds), 3),
    }


def write_prompt_files(folder: Path, prompt_sets: list[list[str]], steps: int, size: int,
                       prefix: str = "p", batch: int | None = None) -> list[Path]:  # fmt: skip
    """One TOML prompt file per prompt set, images seeded 1…N (``batch_size`` if given)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    batching = f"batch_size = {batch}\n" if batch else ""
    for number, prompts in enumerate(prompt_sets):
        lines = [f"[defaults]\nsteps = {steps}\nwidth = {size}\nheight = {size}\n{batching}"]
        lines += [
            f'[[image]]\nprompt = "{prompt}"\nseed = {1 + i}\n' for i, prompt in enumerate(prompts)
        ]
        path = folder / f"{prefix}{number:02d}.toml"
        path.write_text("\n".join(lines))
        paths.append(path)
    return paths


def script_per_job(
    model_folder: Path, out: Path, prompt_sets: list[list[str]], steps: int, size: int,
    threads: int,
) -> list[float]:  # fmt: skip
    """Seconds of each process that loads the model, renders one prompt set, and exits."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    seconds = []
    for number, prompts in enumerate(prompt_sets):
        folder = out / str(number)
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", SCRIPT, str(model_folder), str(folder), str(steps),
                   str(threads), str(size), *prompts]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, env=environment, capture_output=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def bench_warm_vs_processes(
    root: Path, files: int, images: int, size: int, steps: int, threads: int
) -> dict[str, Any]:
    """Ten prompt files through the stage on one warm model, and as one process each."""
    from dropkiln.stages.models import ensure_tiny_model, shared_pipelines

    settings = Settings(root=root)
    prompt_sets = [[f"file {f} image {n}" for n in range(images)] for f in range(files)]
    paths = write_prompt_files(root / "drop" / "prompts", prompt_sets, steps, size)

    shared_pipelines().clear()  # the first file pays for the load, as in a fresh daemon
    started = time.perf_counter()
    for number, path in enumerate(paths):
        out = root / "outputs" / "images" / f"warm-{number}"
        prompt_file = load_prompt_file(path, settings.generate)
        spec = GenerateSpec(
            name=path.stem, model="tiny-sdxl", prompt_file=prompt_file, output_dir=str(out)
        )
        run_generate(spec, LocalContext(root=root, work_dir=root / "state" / "work" / path.stem))
    warm = time.perf_counter() - started

    folder = ensure_tiny_model("tiny-sdxl", root / "state" / "models")
    processes = sum(
        script_per_job(folder, root / "outputs" / "scripts", prompt_sets, steps, size, threads)
    )
    return {
        "files": files,
        "images_per_file": images,
        "size": size,
        "steps": steps,
        "warm_stage_s": round(warm, 2),
        "process_per_file_s": round(processes, 2),
        "speedup": round(processes / warm, 2),
    }


def bench_generate(
    images: int = 8, size: int = 128, steps: int = 8, repeat: int = 3, files: int = 10,
    file_images: int = 2, threads: int = 1, models_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Both generate benchmarks in a temporary ROOT (tiny models from ``models_dir``, or built)."""
    import torch

    from dropkiln.stages.models import ensure_tiny_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        link_models(root, models_dir)
        ensure_tiny_model("tiny-sdxl", root / "state" / "models")
        overhead = bench_stage_overhead(root, images, size, steps, repeat)
        warm = bench_warm_vs_processes(root, files, file_images, size, steps, threads)
    return {
        "overhead": overhead,
        "warm_vs_processes": warm,
        "torch_threads": threads,
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 3) for value in values]


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.generate")
    parser.add_argument("--images", type=int, default=8, help="images in the overhead run")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--file-images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(list(argv))
    figures = bench_generate(args.images, args.size, args.steps, args.repeat, args.files,
                             args.file_images, args.threads)  # fmt: skip
    o, w = figures["overhead"], figures["warm_vs_processes"]
    threads = figures["torch_threads"]
    print(f"tiny-sdxl, {o['size']}x{o['size']}, {o['steps']} steps, {threads} torch thread(s)")
    print(
        f"{o['images']} images: stage {o['stage_s']:.3f}s, direct diffusers {o['direct_s']:.3f}s "
        f"(with PNG save {o['direct_with_png_save_s']:.3f}s)"
    )
    print(
        f"  ratio stage/direct {o['ratio_vs_direct']:.3f}, "
        f"stage/direct+save {o['ratio_vs_direct_with_save']:.3f} (goal <= 1.05)"
    )
    print(
        f"{w['files']} prompt files x {w['images_per_file']} images: warm stage "
        f"{w['warm_stage_s']:.2f}s, one process per file {w['process_per_file_s']:.2f}s "
        f"({w['speedup']:.1f}x)"
    )
    print(f"load average after the runs: {figures['load_average_after']} on {os.cpu_count()} CPUs")
    for key in ("stage_image_s", "direct_image_s"):
        o.pop(key)
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
