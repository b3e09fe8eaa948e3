"""Train stage speed against a minimal diffusers + peft loop on the same cached latents.

Both run in this process on the same warm pipeline, interleaved, best of ``repeat``.
Only training steps are timed (not setup or export). Run
``python -m dropkiln.bench.train [STEPS] [SIZE] [BATCH]``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropkiln.bench.cache import link_models, write_bench_dataset
from dropkiln.config import TrainSettings
from dropkiln.stages.cache import CacheSpec, run_cache
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import TrainSpec, run_train

WARMUP_STEPS = 3


@dataclass
class _TimedContext(LocalContext):
    """Records when each step's progress arrives."""

    stamps: list[float] = field(default_factory=list)

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        self.stamps.append(time.perf_counter())
        super().progress(done, total, **metrics)


def bench_train(
    steps: int = 60,
    size: int = 64,
    batch_size: int = 2,
    rank: int = 8,
    n_images: int = 8,
    model: str = "tiny-sdxl",
    repeat: int = 5,
    models_dir: Path | None = None,
) -> dict[str, Any]:
    """Steps/s of the train stage and of a hand-written loop; their ratio."""
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        link_models(root, models_dir)
        manifest = write_bench_dataset(root, "bench", n_images, size)
        cache_ctx = LocalContext(
            root=root,
            work_dir=root / "state" / "work" / "cache",
            upstream_results={"bucket": {"manifest": str(manifest)}},
        )
        cached = run_cache(CacheSpec(name="bench", model=model), cache_ctx)
        stage_rates: list[float] = []
        loop_rates: list[float] = []
        for attempt in range(repeat):
            stage_rates.append(_stage_rate(root, cached, model, steps, batch_size, rank, attempt))
            loop_rates.append(_loop_rate(root, cached["index"], model, steps, batch_size, rank))
    stage, loop = max(stage_rates), max(loop_rates)
    return {
        "model": model,
        "size": [size, size],
        "batch_size": batch_size,
        "rank": rank,
        "steps": steps,
        "threads": _threads(),
        "stage_steps_per_s": round(stage, 2),
        "stage_all": [round(r, 2) for r in stage_rates],
        "minimal_loop_steps_per_s": round(loop, 2),
        "minimal_loop_all": [round(r, 2) for r in loop_rates],
        "ratio": round(stage / loop, 3),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def _stage_rate(
    root: Path,
    cached: dict[str, Any],
    model: str,
    steps: int,
    batch_size: int,
    rank: int,
    attempt: int,
) -> float:
    options = TrainSettings(
        steps=steps, checkpoint_every=steps, batch_size=batch_size, rank=rank, learning_rate=1e-4
    )
    ctx = _TimedContext(
        root=root,
        work_dir=root / "state" / "work" / f"train-{attempt}",
        upstream_results={"cache": cached},
    )
    spec = TrainSpec(
        name="bench", model=model, options=options, output_dir=str(root / "out" / str(attempt))
    )
    run_train(spec, ctx)
    timed = ctx.stamps[WARMUP_STEPS - 1 :]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def _loop_rate(
    root: Path, index_path: str, model: str, steps: int, batch_size: int, rank: int
) -> float:
    """The loop of diffusers' train_text_to_image_lora_sdxl.py, minus accelerate."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from safetensors.torch import load_file

    from dropkiln.stages.models import resolve_model, shared_pipelines

    index = json.loads(Path(index_path).read_text())
    cache_dir = Path(index["cache_dir"])
    latents = torch.stack(
        [load_file(str(cache_dir / e["latents"]["shard"]))["latents"] for e in index["images"]]
    )
    texts = [load_file(str(cache_dir / e["text"]["shard"])) for e in index["images"]]
    embeds = torch.stack([t["prompt_embeds"] for t in texts])
    pooled = (
        torch.stack([t["pooled_prompt_embeds"] for t in texts])
        if "pooled_prompt_embeds" in texts[0]
        else None
    )
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(texts), dtype=torch.float32)

    pipe = shared_pipelines().get(
        resolve_model(model, root / "state" / "models"), "cpu", torch.float32
    )
    unet = pipe.unet
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), "baseline")
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("constant", optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    stamps = []
    try:
        for _ in range(steps):
            rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
            clean = latents[rows]
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            extra = {}
            if pooled is not None:
                extra["added_cond_kwargs"] = {
                    "text_embeds": pooled[rows],
                    "time_ids": time_ids[rows],
                }
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeds[rows], **extra).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            stamps.append(time.perf_counter())
    finally:
        unet.unload_lora()
        unet.eval()
    timed = stamps[WARMUP_STEPS - 1 :]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def main(argv: Sequence[str] = ()) -> None:
    import torch

    numbers = [int(arg) for arg in argv]
    steps = numbers[0] if numbers else 60
    size = numbers[1] if len(numbers) > 1 else 64
    batch_size = numbers[2] if len(numbers) > 2 else 2
    torch.set_num_threads(int(os.environ.get("DROPKILN_BENCH_THREADS", "1")))
    figures = bench_train(steps=steps, size=size, batch_size=batch_size)
    print(
        f"train stage vs minimal diffusers+peft loop: {figures['model']}, {size}x{size}, "
        f"batch {batch_size}, rank {figures['rank']}, {steps} steps"
    )
    print(f"stage         {figures['stage_steps_per_s']:>7.2f} steps/s  {figures['stage_all']}")
    baseline, baseline_all = figures["minimal_loop_steps_per_s"], figures["minimal_loop_all"]
    print(f"minimal loop  {baseline:>7.2f} steps/s  {baseline_all}")
    print(f"ratio {figures['ratio']:.3f} (goal >= 0.95)")
    print(f"load average after the runs: {figures['load_average_after']} on {os.cpu_count()} CPUs")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
