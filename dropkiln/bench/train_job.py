"""A whole training job, saves included, against a hand-written loop making the same saves.

The inner-loop ratio (bench/train.py) leaves out what a job does besides steps. Here both
sides run a job at the default cadence (8 checkpoints a job, as 2000 steps with
``checkpoint_every = 250``): at each checkpoint a LoRA file (kohya format for the stage),
the training state without pickle, one validation image, and the loss curve; the stage also
records its events (progress, checkpoint, artifacts) and its TensorBoard file. The cost of
keeping every checkpoint's LoRA is the time the stage spends writing the step files, and
their bytes on disk.

Run ``python -m dropkiln.bench.train_job [STEPS]``.
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

from dropkiln.bench.train import cached_bench_dataset
from dropkiln.config import TrainSettings
from dropkiln.stages.cache import CacheResult
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import TrainSpec, run_train

CHECKPOINTS_PER_JOB = 8
VALIDATION_PROMPT = "a photo of sks cat"


def bench_train_job(
    steps: int = 40,
    size: int = 64,
    batch_size: int = 2,
    rank: int = 8,
    n_images: int = 8,
    model: str = "tiny-sdxl",
    repeat: int = 2,
    models_dir: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Seconds per whole job, stage and hand-written loop; their ratio; step-LoRA cost."""
    every = max(1, steps // CHECKPOINTS_PER_JOB)
    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-job-") as scratch:
        root = Path(scratch)
        cached = cached_bench_dataset(root, models_dir, n_images, size, model, device)
        stage_s, loop_s, lora_s, lora_bytes = [], [], [], 0
        for attempt in range(repeat):
            seconds, writing, files = _stage_job(root, cached, model, steps, every, batch_size,
                                                 rank, device, attempt)  # fmt: skip
            stage_s.append(seconds)
            lora_s.append(writing)
            lora_bytes = files
            loop_s.append(_loop_job(root, cached, model, steps, every, batch_size, rank, device))
    stage, loop = min(stage_s), min(loop_s)
    return {
        "model": model,
        "device": device,
        "steps": steps,
        "checkpoint_every": every,
        "batch_size": batch_size,
        "rank": rank,
        "stage_job_s": [round(s, 3) for s in stage_s],
        "loop_job_s": [round(s, 3) for s in loop_s],
        "ratio": round(loop / stage, 3),
        "step_lora_write_s": round(min(lora_s), 4),
        "step_lora_share_of_job": round(min(lora_s) / stage, 4),
        "step_lora_files": (steps - 1) // every,
        "step_lora_bytes_total": lora_bytes,
    }


def _stage_job(
    root: Path,
    cached: CacheResult,
    model: str,
    steps: int,
    every: int,
    batch_size: int,
    rank: int,
    device: str,
    attempt: int,
) -> tuple[float, float, int]:
    from dropkiln.stages.training import exports

    options = TrainSettings(
        steps=steps,
        checkpoint_every=every,
        batch_size=batch_size,
        rank=rank,
        learning_rate=1e-4,
        validation_prompts=[VALIDATION_PROMPT],
    )
    out = root / "out" / f"stage-{attempt}"
    spec = TrainSpec(name="bench", model=model, options=options, output_dir=str(out))
    ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / f"job-{attempt}",
        device=device,
        upstream_results={"cache": cached},
    )
    writing = [0.0]
    original = exports.LoraExports.write_step

    def timed(self: Any, session: Any, step: int) -> Path:
        started = time.perf_counter()
        try:
            return original(self, session, step)
        finally:
            writing[0] += time.perf_counter() - started

    exports.LoraExports.write_step = timed  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        run_train(spec, ctx)
        seconds = time.perf_counter() - started
    finally:
        exports.LoraExports.write_step = original  # type: ignore[method-assign]
    files = sum(p.stat().st_size for p in out.glob("bench-step*.safetensors"))
    return seconds, writing[0], files


def _loop_job(root: Path, cached: CacheResult, model: str, steps: int, every: int,
              batch_size: int, rank: int, device: str) -> float:  # fmt: skip
    """diffusers' train_text_to_image_lora_sdxl.py loop with its saves, minus accelerate."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from dropkiln.stages.models import resolve_model, shared_pipelines
    from dropkiln.stages.models.encoding import compute_dtype
    from dropkiln.stages.training.checkpoint import write_checkpoint
    from dropkiln.stages.training.report import write_loss_csv, write_loss_plot

    started = time.perf_counter()
    dtype = compute_dtype(device)
    index = json.loads(Path(cached.index).read_text())
    cache_dir = Path(index["cache_dir"])
    latents = torch.stack(
        [load_file(str(cache_dir / e["latents"]["shard"]))["latents"] for e in index["images"]]
    ).to(device)
    texts = [load_file(str(cache_dir / e["text"]["shard"])) for e in index["images"]]
    embeds = torch.stack([t["prompt_embeds"] for t in texts]).to(device)
    pooled = torch.stack([t["pooled_prompt_embeds"] for t in texts]).to(device)
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(texts), dtype=torch.float32, device=device)
    ref = resolve_model(model, root / "state" / "models")
    pipe = shared_pipelines().get(ref, device, dtype)
    unet = pipe.unet
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), "job")
    if dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    out = root / "out" / "loop"
    losses: list[tuple[int, float, float]] = []
    try:
        for step in range(1, steps + 1):
            rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
            clean = latents[rows]
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timesteps = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            extra = {"added_cond_kwargs": {"text_embeds": pooled[rows].to(dtype),
                                           "time_ids": time_ids[rows].to(dtype)}}  # fmt: skip
            text = embeds[rows].to(dtype)
            output = unet(noisy.to(dtype), timesteps, encoder_hidden_states=text, **extra)
            prediction = output.sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append((step, float(loss.item()), 1e-4))
            if step % every == 0 or step == steps:
                state = get_peft_model_state_dict(unet, adapter_name="job")
                lora = {k: v.contiguous() for k, v in state.items()}
                out.mkdir(parents=True, exist_ok=True)
                save_file(lora, str(out / f"lora-{step:06d}.safetensors"))
                write_checkpoint(out / f"state-{step:06d}", {"optimizer": optimizer.state_dict()})
                write_loss_csv(out / "loss.csv", losses)
                write_loss_plot(out / "loss.png", losses, "loss")
                unet.eval()
                with torch.no_grad():
                    image = pipe(
                        VALIDATION_PROMPT, width=w, height=h, num_inference_steps=20,
                        generator=torch.Generator().manual_seed(1),
                    ).images[0]  # fmt: skip
                image.save(out / f"validation-{step:06d}.png")
                unet.train()
    finally:
        unet.unload_lora()
        unet.eval()
    return time.perf_counter() - started


def main(argv: Sequence[str] = ()) -> None:
    import torch

    steps = int(argv[0]) if argv else 40
    torch.set_num_threads(int(os.environ.get("DROPKILN_BENCH_THREADS", "1")))
    print(json.dumps(bench_train_job(steps=steps)))


if __name__ == "__main__":
    main(sys.argv[1:])
