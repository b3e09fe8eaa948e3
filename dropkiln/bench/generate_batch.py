"""Batched generation speed: the stage at ``batch_size`` B against one bare diffusers call per
B images (a prompt list and a generator per image), and the stage at B against batch 1.

Run ``python -m dropkiln.bench.generate_batch [--images N] [--batch B] [--size PX] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dropkiln.bench.cache import link_models
from dropkiln.stages.generate import GenerateSpec, run_generate
from dropkiln.stages.generation.prompt_file import ImageEntry, PromptFile
from dropkiln.stages.testing import LocalContext


def batch_prompts(images: int, size: int, steps: int, batch: int) -> PromptFile:
    """``images`` prompts of one setting, seeds 1…N, ``batch`` a call."""
    return PromptFile(
        images=[
            ImageEntry(prompt=f"a lighthouse, study {n}", seed=1 + n, steps=steps, width=size,
                       height=size, batch_size=batch)
            for n in range(images)
        ]
    )  # fmt: skip


def direct_batched(pipe: Any, prompt_file: PromptFile, batch: int) -> list[Any]:
    """The same images from bare pipeline calls of ``batch`` prompts (fresh Euler each)."""
    import torch
    from diffusers import EulerDiscreteScheduler

    entries = prompt_file.images
    original = pipe.scheduler
    images: list[Any] = []
    try:
        for start in range(0, len(entries), batch):
            group = entries[start : start + batch]
            lead = group[0]
            pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
            images += pipe(
                prompt=[entry.prompt for entry in group],
                num_inference_steps=lead.steps,
                guidance_scale=lead.guidance,
                width=lead.width,
                height=lead.height,
                generator=[torch.Generator().manual_seed(entry.seed) for entry in group],
            ).images
    finally:
        pipe.scheduler = original
    return images


def bench_batched(
    root: Path, images: int = 8, batch: int = 4, size: int = 64, steps: int = 4, repeat: int = 3,
    model: str = "tiny-sdxl", device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Images/s of the stage at ``batch`` and at 1, and of bare diffusers at ``batch``."""
    import numpy as np
    from PIL import Image

    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.models import resolve_model, shared_pipelines

    ref = resolve_model(model, root / "state" / "models")
    pipe = shared_pipelines().get(ref, device, inference_dtype(device))
    batched, single = (batch_prompts(images, size, steps, b) for b in (batch, 1))
    counter = iter(range(1_000_000))

    def stage(prompt_file: PromptFile) -> float:
        run = next(counter)
        out = root / "outputs" / "images" / f"batch-{run}"
        spec = GenerateSpec(name="b", model=model, prompt_file=prompt_file, output_dir=str(out))
        ctx = LocalContext(root=root, work_dir=root / "state" / "work" / f"b{run}", device=device)
        started = time.perf_counter()
        run_generate(spec, ctx)
        return time.perf_counter() - started

    def direct() -> float:
        started = time.perf_counter()
        direct_batched(pipe, batched, batch)
        return time.perf_counter() - started

    stage(batched), direct()  # warm-up at this batch size
    stage_s, direct_s, single_s = [], [], []
    for _ in range(repeat):  # interleaved, so a change in load hits all three alike
        stage_s.append(stage(batched))
        direct_s.append(direct())
        single_s.append(stage(single))
    first = root / "outputs" / "images" / "batch-0" / "000-1.png"
    with Image.open(first) as written:
        reference = direct_batched(pipe, batched, batch)[0]
        same = bool(np.array_equal(np.asarray(written.convert("RGB")), np.asarray(reference)))
    return {
        "images": images,
        "batch": batch,
        "size": size,
        "steps": steps,
        "repeat": repeat,
        "device": device,
        "stage_batched_images_per_s": round(images / min(stage_s), 3),
        "direct_batched_images_per_s": round(images / min(direct_s), 3),
        "stage_single_images_per_s": round(images / min(single_s), 3),
        "ratio_vs_direct_batched": round(min(direct_s) / min(stage_s), 3),
        "speedup_batched_vs_single": round(min(single_s) / min(stage_s), 3),
        "same_images_as_direct_batched": same,
        "all_s": {"stage": stage_s, "direct": direct_s, "stage_single": single_s},
    }


def main(argv: Sequence[str] = ()) -> None:
    import torch

    from dropkiln.stages.models import ensure_tiny_model

    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.generate_batch")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(list(argv))
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        link_models(root, None)
        ensure_tiny_model("tiny-sdxl", root / "state" / "models")
        figures = bench_batched(root, args.images, args.batch, args.size, args.steps, args.repeat)
    print(
        f"stage at batch {figures['batch']}: {figures['stage_batched_images_per_s']} images/s, "
        f"direct batched diffusers {figures['direct_batched_images_per_s']} images/s "
        f"(ratio {figures['ratio_vs_direct_batched']}, goal >= 0.97); "
        f"batch {figures['batch']} vs 1: {figures['speedup_batched_vs_single']}x"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
