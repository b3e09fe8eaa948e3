"""Train ``tiny-shapes`` from its seeded init on procedurally drawn scenes.

    python -m dropkiln.stages.models.train_tiny --out tiny-shapes.safetensors

Two phases, both seeded: the VAE learns to reconstruct scenes, then the UNet learns the
noise-prediction loss on the VAE's latents of a fixed set of scenes, conditioned on the
captions through the text encoders, which learn alongside it from their seeded init. With
the defaults the file it writes is the one the package ships; torch's CPU kernels give the
same bits for the same build, CPU features and thread count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.models.shapes_model import COMPONENTS, SHAPES_WORDS, shapes_architecture
from dropkiln.stages.models.shapes_scenes import SIZE, draw_scene, random_scene

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Recipe:
    """Every knob of a training run; the defaults made the shipped weights."""

    seed: int = 1
    threads: int = 1
    vae_steps: int = 600
    vae_batch: int = 8
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    scenes: int = 6000
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    text_encoder_lr: float = 3e-4
    uncond_probability: float = 0.1
    min_snr_gamma: float = 5.0


def train(recipe: Recipe, log: Any = sys.stdout) -> dict[str, torch.Tensor]:
    """The trained weights as one ``component.tensor`` state dict (plus the VAE's scale)."""
    import numpy as np
    import torch

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.Generator(np.random.PCG64(recipe.seed))
    generator = torch.Generator().manual_seed(recipe.seed)
    components = shapes_architecture()
    started = time.monotonic()
    _train_vae(components["vae"], recipe, rng, generator, log)
    print(f"vae trained in {time.monotonic() - started:.0f} s", file=log, flush=True)
    latents, captions = _encode_scenes(components["vae"], recipe, rng)
    scaling = float(1.0 / latents[0].std())
    components["vae"].register_to_config(scaling_factor=scaling)
    _train_unet(components, recipe, latents, captions, generator, log)
    print(f"trained in {time.monotonic() - started:.0f} s", file=log, flush=True)
    state: dict[str, torch.Tensor] = {}
    for key in COMPONENTS:
        for name, tensor in components[key].state_dict().items():
            state[f"{key}.{name}"] = tensor.detach().float().contiguous()
    state["vae_scaling_factor"] = torch.tensor(scaling, dtype=torch.float32)
    return state


def scene_batch(rng: np.random.Generator, count: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` training scenes as a [-1, 1] image batch, with their captions."""
    import numpy as np
    import torch

    scenes = [random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(draw_scene(scene), dtype=np.float32) for scene in scenes])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    return batch, [scene.caption for scene in scenes]


def _train_vae(
    vae: Any, recipe: Recipe, rng: np.random.Generator, generator: torch.Generator, log: Any
) -> None:
    import torch

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.vae_steps)
    for step in range(recipe.vae_steps):
        images, _ = scene_batch(rng, recipe.vae_batch)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        error = torch.nn.functional.l1_loss(reconstruction, images)
        loss = error + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            line = f"vae {step:5d} reconstruction {error.item():.5f} at {_clock()}"
            print(line, file=log, flush=True)
    vae.eval().requires_grad_(False)


def _encode_scenes(
    vae: Any, recipe: Recipe, rng: np.random.Generator
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str]]:
    """Latent means and standard deviations of a fixed set of scenes, with captions."""
    import torch

    means, stds, captions = [], [], []
    with torch.no_grad():
        for start in range(0, recipe.scenes, 250):
            images, texts = scene_batch(rng, min(250, recipe.scenes - start))
            dist = vae.encode(images).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            captions += texts
    return (torch.cat(means), torch.cat(stds)), captions


def shapes_pipeline(components: dict[str, Any]) -> Any:
    """A StableDiffusionXLPipeline over ``components`` with tiny-shapes' tokenizer."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from dropkiln.stages.models.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder), SHAPES_WORDS)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    pipe: Any = StableDiffusionXLPipeline(
        tokenizer=tokenizer, tokenizer_2=tokenizer, force_zeros_for_empty_prompt=True,
        **{key: components[key] for key in (*COMPONENTS, "scheduler")},
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train_unet(
    components: dict[str, Any],
    recipe: Recipe,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    generator: torch.Generator,
    log: Any,
) -> None:
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from dropkiln.stages.training.losses import min_snr_weights

    unet = components["unet"]
    encoders = [components["text_encoder"], components["text_encoder_2"]]
    pipe = shapes_pipeline(components)
    scaling = float(components["vae"].config.scaling_factor)
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    text_parameters = [p for encoder in encoders for p in encoder.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": recipe.unet_lr},
            {"params": text_parameters, "lr": recipe.text_encoder_lr},
        ],
        weight_decay=1e-4,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_cosine(recipe.unet_steps))
    trained = [*unet.parameters(), *text_parameters]
    ema = EMAModel(trained, use_ema_warmup=True, power=0.75)
    for module in (unet, *encoders):
        module.train().requires_grad_(True)
    for step in range(recipe.unet_steps):
        pick = torch.randint(0, len(captions), (recipe.unet_batch,), generator=generator)
        mean, std = latents[0][pick], latents[1][pick]
        clean = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pick),),
                                  generator=generator)  # fmt: skip
        keep = (torch.rand(len(pick), generator=generator) >= recipe.uncond_probability).float()
        # the text encoders learn too: seeded random ones tell captions apart only faintly
        encoded = pipe.encode_prompt(
            prompt=[captions[i] for i in pick.tolist()], device="cpu",
            num_images_per_prompt=1, do_classifier_free_guidance=False,
        )  # fmt: skip
        # an empty prompt is all zeros at generation (force_zeros_for_empty_prompt)
        embeds = encoded[0] * keep[:, None, None]
        pooled = encoded[2] * keep[:, None]
        prediction = unet(
            scheduler.add_noise(clean, noise, timesteps),
            timesteps,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(len(pick), 1)},
        ).sample
        weights = min_snr_weights(scheduler, timesteps, recipe.min_snr_gamma)
        per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(trained)
        if step % 50 == 0 or step == recipe.unet_steps - 1:
            print(f"unet {step:5d} loss {loss.item():.5f} at {_clock()}", file=log, flush=True)
    ema.copy_to(trained)
    for module in (unet, *encoders):
        module.eval().requires_grad_(False)


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _warmup_then_cosine(total: int, warmup: int = 100) -> Any:
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def save_weights(state: dict[str, torch.Tensor], path: Path, recipe: Recipe) -> str:
    """Write the weights (sorted keys, no timestamps: the same run gives the same bytes)."""
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    from dropkiln.stages.models.refs import file_sha256

    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes several in a per-process random (hash) order.
    metadata = {"dropkiln.recipe": json.dumps(asdict(recipe), sort_keys=True)}
    save_file(dict(sorted(state.items())), str(path), metadata=metadata)
    return file_sha256(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tiny-shapes.safetensors"))
    defaults = Recipe()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in vars(defaults)})
    state = train(recipe)
    digest = save_weights(state, args.out, recipe)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.1f} MB), sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
