"""The clean baselines: plain diffusers (and peft) in a fresh process that shares nothing with
dropkiln. Three scripts: images one call each or in batches (``SERVER``), batched images
saved with their infotext as the daemon saves them (``BATCHED_SERVER``), and a LoRA trained
with the daemon's saves (``CLEAN_TRAINER``).

Each process imports diffusers and torch only (no dropkiln module), loads the model once,
then does what it is asked on stdin, one JSON request a line, and answers each with the
seconds it took. Its torch runs with the defaults a user's own script would get (threads
included), on its main thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_LOAD_PIPELINE = r"""
import json, sys, time
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
from PIL.PngImagePlugin import PngInfo
folder, threads = sys.argv[1], int(sys.argv[2])
if threads > 0:
    torch.set_num_threads(threads)
pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
print(json.dumps({"threads": torch.get_num_threads()}), flush=True)

def render(group, inference=False):
    # one call for the images of group, one generator each: the images, and the wall and
    # CPU seconds inside the call
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    called, on_cpu = time.perf_counter(), time.thread_time()
    with torch.inference_mode(inference):
        pictures = pipe(prompt=[image["prompt"] for image in group],
                        num_inference_steps=group[0]["steps"],
                        guidance_scale=group[0]["guidance"], width=group[0]["width"],
                        height=group[0]["height"],
                        generator=[torch.Generator().manual_seed(image["seed"])
                                   for image in group]).images
    return pictures, time.perf_counter() - called, time.thread_time() - on_cpu
"""
"""The start both clean image servers share: load the pipeline from the folder, set the
thread count, say which count torch runs with, and define the one call they make."""

SERVER = (
    _LOAD_PIPELINE
    + r"""
for line in sys.stdin:
    request = json.loads(line)
    started, inside, cpu = time.perf_counter(), 0.0, 0.0
    images, batch = request["images"], request.get("batch", 1)
    for first in range(0, len(images), batch):
        group = images[first:first + batch]
        pictures, wall, on_cpu = render(group, request.get("inference_mode", False))
        inside, cpu = inside + wall, cpu + on_cpu
        for number, picture in enumerate(pictures, start=first):
            picture.save(f"{request['out']}/{number:03d}.png")
    print(json.dumps({"seconds": time.perf_counter() - started, "pipeline": inside,
                      "pipeline_cpu": cpu}), flush=True)
"""
)


class CleanProcess:
    """A baseline script in a fresh process of its own, kept warm between requests: it says
    its torch thread count once, then answers each JSON request line with one JSON line."""

    def __init__(self, script: str, model_folder: Path, threads: int = 0) -> None:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        environment.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, str(model_folder), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
        )
        self.threads = int(self._answer()["threads"])
        self.outside_s: list[float] = []
        """Per render: its seconds outside pipeline calls (scheduler set-up, PNG saves)."""
        self.inside_s: list[tuple[float, float]] = []
        """Per render: wall and main-thread CPU seconds inside pipeline calls."""

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the clean baseline process exited ({self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _timed(self, answer: dict[str, Any]) -> float:
        """A render's seconds; those outside its pipeline calls are kept in ``outside_s``."""
        seconds = float(answer["seconds"])
        self.outside_s.append(seconds - float(answer["pipeline"]))
        self.inside_s.append((float(answer["pipeline"]), float(answer["pipeline_cpu"])))
        return seconds

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class CleanDiffusers(CleanProcess):
    """Plain diffusers rendering, kept warm between requests like the daemon's model."""

    def __init__(self, model_folder: Path, threads: int = 0) -> None:
        super().__init__(SERVER, model_folder, threads)

    def render(
        self, images: list[dict[str, Any]], out: Path, batch: int = 1, inference_mode: bool = False
    ) -> float:
        """Seconds from the request to the last PNG saved in ``out``; ``batch`` images of the
        same settings per pipeline call, each from its own seed (with ``inference_mode``, the
        calls under ``torch.inference_mode``, as the daemon makes them; a user's script
        relies on the ``torch.no_grad`` diffusers puts on its calls)."""
        out.mkdir(parents=True, exist_ok=True)
        request = {"images": images, "out": str(out), "batch": batch}
        return self._timed(self.ask({**request, "inference_mode": inference_mode}))


BATCHED_SERVER = (
    _LOAD_PIPELINE
    + r"""
for line in sys.stdin:
    request = json.loads(line)
    started, inside, cpu = time.perf_counter(), 0.0, 0.0
    images, batch = request["images"], request["batch"]
    for first in range(0, len(images), batch):
        group = images[first:first + batch]
        pictures, wall, on_cpu = render(group)
        inside, cpu = inside + wall, cpu + on_cpu
        for image, picture in zip(group, pictures):
            info = PngInfo()
            info.add_text("parameters", image["parameters"])
            picture.save(f"{request['out']}/{image['stem']}.png", pnginfo=info)
    print(json.dumps({"seconds": time.perf_counter() - started, "pipeline": inside,
                      "pipeline_cpu": cpu}), flush=True)
"""
)
"""What a user's batched script does to get the daemon's files: a diffusers call per batch,
then each image saved with its A1111 infotext (no fsync: a script does not make one)."""


class CleanBatched(CleanProcess):
    """Batched plain diffusers in a fresh process, saving PNGs with their infotext."""

    def __init__(self, model_folder: Path, threads: int = 0) -> None:
        super().__init__(BATCHED_SERVER, model_folder, threads)

    def render(self, images: list[dict[str, Any]], out: Path, batch: int) -> float:
        """Seconds from the request to the last PNG saved in ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        return self._timed(self.ask({"images": images, "out": str(out), "batch": batch}))


CLEAN_TRAINER = r"""
import csv, json, sys, time
from pathlib import Path
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import cast_training_params
from PIL import Image
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch.utils.tensorboard import SummaryWriter

folder, threads = sys.argv[1], int(sys.argv[2])
if threads > 0:
    torch.set_num_threads(threads)
device = "cpu"
dtype = torch.float32
pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
print(json.dumps({"threads": torch.get_num_threads()}), flush=True)

def encode(dataset):
    images = sorted(Path(dataset).glob("*.png"))
    pixels = [torch.from_numpy(__import__("numpy").asarray(Image.open(p).convert("RGB")).copy())
              for p in images]
    batch = torch.stack(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [p.with_suffix(".txt").read_text() for p in images]
    with torch.no_grad():
        latents = pipe.vae.encode(batch).latent_dist.sample() * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    return latents, embeds, pooled

for line in sys.stdin:
    job = json.loads(line)
    # The whole job is timed, as a user's script run on a fresh dataset would be: reading
    # the images and captions, encoding them, adding the adapters, the steps and the saves.
    started, cpu = time.perf_counter(), time.process_time()
    latents, embeds, pooled = encode(job["dataset"])
    encoded = time.perf_counter()
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(latents), dtype=torch.float32)
    unet = pipe.unet
    unet.requires_grad_(False)
    rank = job["rank"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "job")
    cast_training_params(unet, dtype=torch.float32)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job["learning_rate"])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    # The held-out loss the job tracks: the first 4 images, each at 4 fixed timesteps with
    # fixed noise, no gradients, at every checkpoint.
    val_t = torch.tensor([0, 333, 666, 999])
    val_generator = torch.Generator().manual_seed(job["seed"] + 0x5EED)
    val_noise = [torch.randn((len(val_t), *latents.shape[1:]), generator=val_generator)
                 for _ in range(min(4, len(latents)))]
    writer = SummaryWriter(str(out / "tensorboard"))
    losses = []

    # One function a part, so a profile (bench --profile) names each.
    def train_step(step):
        rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
        noise = torch.randn(latents[rows].shape, generator=generator)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents[rows], noise, timesteps)
        extra = {"text_embeds": pooled[rows], "time_ids": time_ids[rows]}
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds[rows],
                          added_cond_kwargs=extra).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((step, float(loss.item())))
        writer.add_scalar("loss", losses[-1][1], step)

    def save_files(step):
        lora = {k: v.contiguous() for k, v in
                get_peft_model_state_dict(unet, adapter_name="job").items()}
        save_file(lora, str(out / f"lora-step{step:06d}.safetensors"))
        state = {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items()
                 for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0}
        save_file(state, str(out / f"state-step{step:06d}.safetensors"))
        with open(out / "loss.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("step", "loss"), *losses])

    def validation_image(step):
        image = pipe(job["validation_prompt"], width=w, height=h,
                     num_inference_steps=job["validation_steps"],
                     guidance_scale=job["validation_guidance"],
                     generator=torch.Generator().manual_seed(1)).images[0]
        image.save(out / f"validation-step{step:06d}.png")
        pixels = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1)
        writer.add_image("validation", pixels, step)

    def validation_loss(step):
        total = 0.0
        for i, noise in enumerate(val_noise):
            rows = [i] * len(val_t)
            noisy = noise_scheduler.add_noise(latents[rows], noise, val_t)
            extra = {"text_embeds": pooled[rows], "time_ids": time_ids[rows]}
            prediction = unet(noisy, val_t, encoder_hidden_states=embeds[rows],
                              added_cond_kwargs=extra).sample
            total += float(torch.nn.functional.mse_loss(
                prediction.float(), noise.float(), reduction="sum")) / noise[0].numel()
        writer.add_scalar("loss/validation", total / (len(val_noise) * len(val_t)), step)

    batch_size, every, steps = job["batch_size"], job["checkpoint_every"], job["steps"]
    for step in range(1, steps + 1):
        train_step(step)
        if step % every == 0 or step == steps:
            save_files(step)
            unet.eval()
            with torch.no_grad():
                validation_image(step)
                validation_loss(step)
            unet.train()
    writer.close()
    finished = time.perf_counter()
    unet.delete_adapters("job")
    unet.eval()
    print(json.dumps({"seconds": finished - started, "after_encode": finished - encoded,
                      "cpu_seconds": time.process_time() - cpu}), flush=True)
"""


class CleanTrainer(CleanProcess):
    """The baseline training process, model loaded once, one job a line on stdin."""

    def __init__(self, model_folder: Path, threads: int = 0) -> None:
        super().__init__(CLEAN_TRAINER, model_folder, threads)

    def train(self, job: dict[str, Any]) -> tuple[float, float, float]:
        """Seconds of the whole job (reading and encoding the dataset included), of the part
        after encoding (adapters, steps, saves), and the process's CPU seconds in the job."""
        answer = self.ask(job)
        return float(answer["seconds"]), float(answer["after_encode"]), answer["cpu_seconds"]
