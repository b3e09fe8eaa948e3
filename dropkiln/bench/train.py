"""Train stage speed against a minimal diffusers + peft loop on the same cached latents.

Both run in this process on the same warm pipeline, interleaved, best of ``repeat``.
Only training steps are timed (not setup or export); the first WARMUP_STEPS of each run
are left out. Run ``python -m dropkiln.bench.train [STEPS] [SIZE] [BATCH]``.
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
from dropkiln.bench.phases import PhaseTimeline, phase_summary, training_phase_rows
from dropkiln.bench.profile import Profiler
from dropkiln.bench.stats import intervals
from dropkiln.config import TrainSettings
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import CacheResult, CacheSpec, run_cache
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import TrainSpec, run_train

WARMUP_STEPS = 3
PROFILED_STEPS = 10


@dataclass
class _TimedContext(LocalContext):
    """Records when each step's progress arrives."""

    stamps: list[float] = field(default_factory=list)

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        self.stamps.append(time.perf_counter())
        super().progress(done, total, **metrics)


@dataclass
class _Run:
    """One timed run: step end times, (step, loss) pairs and its phase timeline."""

    stamps: list[float]
    losses: list[tuple[int, float]]
    timeline: PhaseTimeline
    warmup: int = WARMUP_STEPS

    @property
    def timed(self) -> list[float]:
        """Step end times from the end of the last warm-up step on."""
        return self.stamps[max(self.warmup, 1) - 1 :]

    @property
    def steps_per_s(self) -> float:
        timed = self.timed
        return (len(timed) - 1) / (timed[-1] - timed[0])

    @property
    def step_seconds(self) -> list[float]:
        return intervals(self.timed)


def cached_bench_dataset(
    root: Path, models_dir: Path | None, n_images: int, size: int, model: str, device: str
) -> CacheResult:
    """The benchmark dataset in ROOT, bucketed and cached: the cache stage's result."""
    link_models(root, models_dir)
    manifest = write_bench_dataset(root, "bench", n_images, size)
    cache_ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / "cache",
        device=device,
        upstream_results={"bucket": BucketResult.of(manifest)},
    )
    return run_cache(CacheSpec(name="bench", model=model), cache_ctx)


def bench_train(
    steps: int = 60,
    size: int = 64,
    batch_size: int = 2,
    rank: int = 8,
    n_images: int = 8,
    model: str = "tiny-sdxl",
    repeat: int = 5,
    models_dir: Path | None = None,
    device: str = "cpu",
    profiler: Profiler | None = None,
    warmup: int = WARMUP_STEPS,
) -> dict[str, Any]:
    """Steps/s of the train stage and of a hand-written loop; their ratio, phases, losses."""
    if steps < warmup + 2:
        raise ValueError(f"{steps} steps leave fewer than 2 timed steps after {warmup} warm-up")
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-") as scratch:
        root = Path(scratch)
        cached = cached_bench_dataset(root, models_dir, n_images, size, model, device)
        setup = _Setup(root, cached, model, batch_size, rank, device, warmup)
        stage_runs: list[_Run] = []
        loop_runs: list[_Run] = []
        for attempt in range(repeat):
            stage_runs.append(_stage_run(setup, steps, attempt))
            loop_runs.append(_loop_run(setup, steps))
        profile = None
        if profiler is not None:
            # the steps after the warm-up only: not the set-up, checkpoint or export
            profiled = warmup + PROFILED_STEPS
            profile = profiler(lambda: _stage_run(setup, profiled, -1), (warmup, profiled))
    stage_rates = [run.steps_per_s for run in stage_runs]
    loop_rates = [run.steps_per_s for run in loop_runs]
    stage, loop = max(stage_rates), max(loop_rates)
    figures: dict[str, Any] = {
        "model": model,
        "device": device,
        "size": [size, size],
        "batch_size": batch_size,
        "rank": rank,
        "steps": steps,
        "warmup_steps": warmup,
        "threads": _threads(),
        "stage_steps_per_s": round(stage, 2),
        "stage_all": [round(r, 2) for r in stage_rates],
        "minimal_loop_steps_per_s": round(loop, 2),
        "minimal_loop_all": [round(r, 2) for r in loop_rates],
        "ratio": round(stage / loop, 3),
        "stage_step_s": [s for run in stage_runs for s in run.step_seconds],
        "minimal_loop_step_s": [s for run in loop_runs for s in run.step_seconds],
        "stage_phases": _phases(stage_runs),
        "minimal_loop_phases": _phases(loop_runs),
        "stage_losses": stage_runs[-1].losses,
        "minimal_loop_losses": loop_runs[-1].losses,
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    if profile is not None:
        figures["profile"] = profile
    return figures


@dataclass(frozen=True)
class _Setup:
    root: Path
    cached: CacheResult
    model: str
    batch_size: int
    rank: int
    device: str
    warmup: int

    def pipe(self) -> Any:
        """The warm pipeline both sides train on (the stage finds the same one)."""
        from dropkiln.stages.models import resolve_model, shared_pipelines
        from dropkiln.stages.models.encoding import compute_dtype

        ref = resolve_model(self.model, self.root / "state" / "models")
        return shared_pipelines().get(ref, self.device, compute_dtype(self.device))

    def timeline(self) -> PhaseTimeline:
        timeline = PhaseTimeline(self.device)
        timeline.watch_module("unet", self.pipe().unet)
        timeline.watch_optimizer_steps()
        timeline.mark()
        return timeline


def _phases(runs: Sequence[_Run]) -> dict[str, Any]:
    rows = [row for run in runs for row in training_phase_rows(run.timeline, run.warmup)]
    return phase_summary(rows, ("data", "forward", "backward", "optimizer"))


def _stage_run(setup: _Setup, steps: int, attempt: int) -> _Run:
    root = setup.root
    options = TrainSettings(
        steps=steps,
        checkpoint_every=steps,
        batch_size=setup.batch_size,
        rank=setup.rank,
        learning_rate=1e-4,
    )
    ctx = _TimedContext(
        root=root,
        work_dir=root / "state" / "work" / f"train-{attempt}",
        device=setup.device,
        upstream_results={"cache": setup.cached},
    )
    spec = TrainSpec(
        name="bench",
        model=setup.model,
        options=options,
        output_dir=str(root / "out" / str(attempt)),
    )
    with setup.timeline() as timeline:
        run_train(spec, ctx)
    losses = [(done, float(metrics["loss"])) for done, _, metrics in ctx.progress_log]
    return _Run(ctx.stamps, losses, timeline, setup.warmup)


def _loop_run(setup: _Setup, steps: int) -> _Run:
    """The loop of diffusers' train_text_to_image_lora_sdxl.py, minus accelerate."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from safetensors.torch import load_file

    from dropkiln.stages.models.encoding import compute_dtype

    device, batch_size = setup.device, setup.batch_size
    dtype = compute_dtype(device)
    index = json.loads(Path(setup.cached.index).read_text())
    cache_dir = Path(index["cache_dir"])
    latents = torch.stack(
        [load_file(str(cache_dir / e["latents"]["shard"]))["latents"] for e in index["images"]]
    ).to(device)
    texts = [load_file(str(cache_dir / e["text"]["shard"])) for e in index["images"]]
    embeds = torch.stack([t["prompt_embeds"] for t in texts]).to(device)
    pooled = (
        torch.stack([t["pooled_prompt_embeds"] for t in texts]).to(device)
        if "pooled_prompt_embeds" in texts[0]
        else None
    )
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(texts), dtype=torch.float32, device=device)

    pipe = setup.pipe()
    unet = pipe.unet
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(
        LoraConfig(r=setup.rank, lora_alpha=setup.rank, target_modules=targets), "baseline"
    )
    if dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("constant", optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    autocast = device.startswith("cuda") and dtype != torch.float32
    stamps, losses = [], []
    timeline = setup.timeline()
    try:
        for step in range(steps):
            rows = torch.randint(0, len(latents), (batch_size,), generator=generator).to(device)
            clean = latents[rows]
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timesteps = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            extra = {}
            if pooled is not None:
                extra["added_cond_kwargs"] = {
                    "text_embeds": pooled[rows].to(dtype),
                    "time_ids": time_ids[rows].to(dtype),
                }
            with torch.autocast(device.split(":")[0], dtype, enabled=autocast):
                prediction = unet(
                    noisy.to(dtype), timesteps, encoder_hidden_states=embeds[rows].to(dtype),
                    **extra,
                ).sample  # fmt: skip
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append((step + 1, float(loss.item())))
            stamps.append(time.perf_counter())
    finally:
        timeline.remove()
        unet.unload_lora()
        unet.eval()
    return _Run(stamps, losses, timeline, setup.warmup)


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
    summary = {k: v for k, v in figures.items() if not k.endswith(("_step_s", "_losses"))}
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
