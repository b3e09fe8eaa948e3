"""Batched generation speed: the stage at ``batch_size`` B against what a user's script does to
get the same files (one diffusers call per B images, a prompt list and a generator per image,
then each image saved as a PNG with the same A1111 ``parameters`` text), and the stage at B
against batch 1. The stage's time is its whole run: records, contact sheet and fsyncs too.

Run ``python -m dropkiln.bench.generate_batch [--images N] [--batch B] [--size PX] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dropkiln.bench.cache import link_models
from dropkiln.stages.generate import GenerateSpec, run_generate
from dropkiln.stages.generation.png_files import DROPKILN_KEY, PARAMETERS_KEY, read_png_text
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


def direct_batched(
    pipe: Any, prompt_file: PromptFile, batch: int, save_to: Path | None = None,
    infotexts: Sequence[str] = (),
) -> list[Any]:  # fmt: skip
    """The same images from bare pipeline calls of ``batch`` prompts (fresh Euler each), each
    saved to ``save_to`` (if given) as ``NNN.png`` with its infotext, as a script would."""
    import torch
    from diffusers import EulerDiscreteScheduler
    from PIL.PngImagePlugin import PngInfo

    entries = prompt_file.images
    original = pipe.scheduler
    images: list[Any] = []
    try:
        for start in range(0, len(entries), batch):
            group = entries[start : start + batch]
            lead = group[0]
            pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
            pictures = pipe(
                prompt=[entry.prompt for entry in group],
                num_inference_steps=lead.steps,
                guidance_scale=lead.guidance,
                width=lead.width,
                height=lead.height,
                generator=[torch.Generator().manual_seed(entry.seed) for entry in group],
            ).images
            if save_to is not None:
                for number, picture in enumerate(pictures, start=start):
                    info = PngInfo()
                    info.add_text(PARAMETERS_KEY, infotexts[number])
                    picture.save(save_to / f"{number:03d}.png", pnginfo=info)
            images += pictures
    finally:
        pipe.scheduler = original
    return images


class CallClock:
    """Seconds spent inside the pipeline's calls (the class's ``__call__`` wrapped while the
    bench runs): a run's time outside them is the work around the model, on either side."""

    def __init__(self, pipe: Any) -> None:
        self.pipeline_class, self.seconds = type(pipe), 0.0
        self.original = self.pipeline_class.__call__

    def __enter__(self) -> CallClock:
        original = self.original

        def timed(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(pipe, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        self.pipeline_class.__call__ = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipeline_class.__call__ = self.original

    def outside(self, work: Callable[[], object]) -> tuple[float, float]:
        """``work``'s seconds, and the part of them outside pipeline calls."""
        inside = self.seconds
        started = time.perf_counter()
        work()
        total = time.perf_counter() - started
        return total, total - (self.seconds - inside)


def bench_batched(
    root: Path, images: int = 8, batch: int = 4, size: int = 64, steps: int = 4, repeat: int = 3,
    model: str = "tiny-sdxl", device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Images/s of the stage at ``batch`` and at 1, and of bare diffusers at ``batch``."""
    import numpy as np
    from PIL import Image

    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.models import resolve_model, shared_pipelines

    load_before = os.getloadavg()
    ref = resolve_model(model, root / "state" / "models")
    pipe = shared_pipelines().get(ref, device, inference_dtype(device))
    batched, single = (batch_prompts(images, size, steps, b) for b in (batch, 1))
    counter = iter(range(1_000_000))
    direct_folders: list[Path] = []

    clock = CallClock(pipe)
    outside: dict[str, list[float]] = {"stage": [], "direct": []}

    def stage(prompt_file: PromptFile) -> float:
        run = next(counter)
        out = root / "outputs" / "images" / f"batch-{run}"
        spec = GenerateSpec(name="b", model=model, prompt_file=prompt_file, output_dir=str(out))
        ctx = LocalContext(root=root, work_dir=root / "state" / "work" / f"b{run}", device=device)
        total, extra = clock.outside(lambda: run_generate(spec, ctx))
        if prompt_file is batched:
            outside["stage"].append(extra)
        return total

    def direct() -> float:
        out = root / "direct" / str(next(counter))
        out.mkdir(parents=True)
        direct_folders.append(out)
        total, extra = clock.outside(lambda: direct_batched(pipe, batched, batch, out, infotexts))
        outside["direct"].append(extra)
        return total

    with clock:
        stage(batched)  # warm-up at this batch size; its files give the infotexts
        warm_up = sorted((root / "outputs" / "images" / "batch-0").glob("0*.png"))
        infotexts = [read_png_text(path)[PARAMETERS_KEY] for path in warm_up]
        direct()
        stage_s, direct_s, single_s = [], [], []
        for _ in range(repeat):  # interleaved, so a change in load hits all three alike
            stage_s.append(stage(batched))
            direct_s.append(direct())
            single_s.append(stage(single))
    direct_files = sorted(direct_folders[0].glob("*.png"))  # the warm-up's: same prompts
    same = len(direct_files) == len(warm_up)
    for mine, theirs in zip(warm_up, direct_files, strict=False):
        with Image.open(mine) as written, Image.open(theirs) as reference:
            same = same and bool(np.array_equal(np.asarray(written.convert("RGB")),
                                                np.asarray(reference.convert("RGB"))))  # fmt: skip
        same = same and read_png_text(mine) == {**read_png_text(theirs), **_record(mine)}
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
        "same_files_as_direct_batched": same,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "all_s": {"stage": stage_s, "direct": direct_s, "stage_single": single_s},
        # the batched runs' seconds outside pipeline calls (warm-up first): saving the files
        # on both sides; the stage's records, checkpoints and contact sheet too
        "outside_pipeline_s": {side: _rounded(values) for side, values in outside.items()},
        "outside_pipeline_median_s": {
            side: round(statistics.median(values[1:]), 4) for side, values in outside.items()
        },
    }


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 4) for value in values]


def _record(path: Path) -> dict[str, str]:
    """The stage's own ``dropkiln`` chunk (a script writes none)."""
    return {DROPKILN_KEY: read_png_text(path)[DROPKILN_KEY]}


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
    print(f"outside pipeline calls (median): {figures['outside_pipeline_median_s']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
