"""Train ``tiny-shapes`` from its seeded init on procedurally drawn scenes.

    python -m dropkiln.stages.models.train_tiny --out tiny-shapes.safetensors

Three phases, all seeded: the VAE learns to reconstruct scenes in any colour (from the
posterior mean, its loss weighted toward the shape and its colour), and optionally
(``--decoder-steps``, off in the shipped recipe) its decoder alone then learns their edges
(shapes_vae); the text encoders learn
to tell the caption words apart (shapes_text); then the UNet learns the noise-prediction
loss on the VAE's latent means of a fixed set of scenes, conditioned on the captions through
the text encoders, which keep learning alongside it. With the defaults the file it writes is
the one the package ships; torch's CPU kernels give the same bits for the same build, CPU
features and thread count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.models.shapes_detect import vae_readback
from dropkiln.stages.models.shapes_model import COMPONENTS, SHAPES_WORDS, shapes_architecture
from dropkiln.stages.models.shapes_scenes import SIZE, random_scene
from dropkiln.stages.models.shapes_text import separate_caption_words
from dropkiln.stages.models.shapes_vae import (
    scene_batch,
    shape_mask,
    sharpen_decoder,
    train_codec,
)

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Recipe:
    """Every knob of a training run; the defaults made the shipped weights."""

    seed: int = 2
    threads: int = 2
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    shape_weight: float = 8.0
    colour_weight: float = 1.0
    decoder_steps: int = 0
    decoder_lr: float = 1e-3
    edge_margin: int = 2
    edge_weight: float = 2.0
    latent_noise: float = 0.0
    text_steps: int = 300
    text_batch: int = 32
    text_lr: float = 2e-3
    scenes: int = 6000
    unet_steps: int = 4500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    text_encoder_lr: float = 3e-4
    uncond_probability: float = 0.1
    min_snr_gamma: float = 5.0
    footprint_weight: float = 3.0

    def recorded(self) -> dict[str, Any]:
        """The knobs a weights file names: those of a phase that did not run are left out,
        so a recipe that gained an optional phase still writes the bytes it wrote before."""
        from dataclasses import asdict

        knobs = asdict(self)
        if self.decoder_steps <= 0:
            for name in _DECODER_KNOBS:
                del knobs[name]
        return knobs


_DECODER_KNOBS = ("decoder_steps", "decoder_lr", "edge_margin", "edge_weight", "latent_noise")


Checkpoint = tuple[int, Callable[[int, dict[str, "torch.Tensor"]], None]]
"""(every so many UNet steps, a callback given the step count and the weights so far)."""


def train(
    recipe: Recipe, log: Any = sys.stdout, checkpoint: Checkpoint | None = None
) -> dict[str, torch.Tensor]:
    """The trained weights as one ``component.tensor`` state dict (plus the VAE's scale);
    ``checkpoint`` is also handed the (EMA) weights part-way through the UNet phase."""
    import torch

    started = time.monotonic()
    components, rng = _start(recipe)
    generator = torch.Generator().manual_seed(recipe.seed)
    _train_vae(components["vae"], recipe, rng, log)
    print(f"vae trained in {time.monotonic() - started:.0f} s", file=log, flush=True)
    readback = vae_readback(components["vae"])
    print(f"vae reconstructions read back: {readback}", file=log, flush=True)
    text_steps = (recipe.text_steps, recipe.text_batch, recipe.text_lr)
    separate_caption_words(shapes_pipeline(components), text_steps, lambda: random_scene(rng), log)
    latents, footprints, captions = _encode_scenes(components["vae"], recipe, rng)
    scaling = float(1.0 / latents.std())
    components["vae"].register_to_config(scaling_factor=scaling)
    scenes = (latents, footprints, captions)
    _train_unet(components, recipe, scenes, generator, log, checkpoint)
    print(f"trained in {time.monotonic() - started:.0f} s", file=log, flush=True)
    return _weights(components)


def train_vae(recipe: Recipe, log: Any = sys.stdout) -> Any:
    """The VAE as ``train`` gives it (its two VAE phases, alone)."""
    components, rng = _start(recipe)
    _train_vae(components["vae"], recipe, rng, log)
    return components["vae"]


def _train_vae(vae: Any, recipe: Recipe, rng: np.random.Generator, log: Any) -> None:
    train_codec(vae, recipe, rng, log)
    sharpen_decoder(vae, recipe, log)


def _start(recipe: Recipe) -> tuple[dict[str, Any], np.random.Generator]:
    """The seeded components and scene stream every run starts from."""
    import numpy as np
    import torch

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    components = shapes_architecture()
    # channels-last convolutions run about 1.5x faster on the CPU for these narrow layers
    for key in ("unet", "vae"):
        components[key].to(memory_format=torch.channels_last)
    return components, np.random.Generator(np.random.PCG64(recipe.seed))


def _weights(components: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch

    state: dict[str, torch.Tensor] = {}
    for key in COMPONENTS:
        for name, tensor in components[key].state_dict().items():
            state[f"{key}.{name}"] = tensor.detach().float().clone().contiguous()
    scaling = float(components["vae"].config.scaling_factor)
    state["vae_scaling_factor"] = torch.tensor(scaling, dtype=torch.float32)
    return state


def _encode_scenes(
    vae: Any, recipe: Recipe, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latent means of a fixed set of training scenes, their shapes' footprints on the
    latent grid, and their captions."""
    import torch

    means, footprints, captions = [], [], []
    with torch.no_grad():
        for start in range(0, recipe.scenes, 250):
            images, texts = scene_batch(rng, min(250, recipe.scenes - start))
            means.append(vae.encode(images).latent_dist.mean)
            footprints.append(latent_footprint(images, means[-1].shape[-1]))
            captions += texts
    return torch.cat(means), torch.cat(footprints), captions


def latent_footprint(images: torch.Tensor, side: int) -> torch.Tensor:
    """1 on the latent pixels a scene's shape covers, and one latent pixel around them
    (the decoder reads a shape's edge from its neighbours too), else 0."""
    import torch

    pool = torch.nn.functional.max_pool2d
    covered = pool(shape_mask(images), images.shape[-1] // side)
    return pool(covered, 3, 1, 1)


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
    scenes: tuple[torch.Tensor, torch.Tensor, list[str]],
    generator: torch.Generator,
    log: Any,
    checkpoint: Checkpoint | None = None,
) -> None:
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from dropkiln.stages.training.losses import min_snr_weights

    latents, footprints, captions = scenes
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
        clean = latents[pick] * scaling
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
        # The shape covers a few of the 1024 latent values (a square's corners fewer still):
        # weighed k times there, its edges are what the loss is about, not the background.
        footprint = 1.0 + recipe.footprint_weight * footprints[pick]
        squared = footprint * (prediction - noise) ** 2
        per_sample = squared.mean(dim=(1, 2, 3)) / footprint.mean(dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(trained)
        if step % 50 == 0 or step == recipe.unet_steps - 1:
            print(f"unet {step:5d} loss {loss.item():.5f} at {_clock()}", file=log, flush=True)
        if checkpoint and (step + 1) % checkpoint[0] == 0 and step + 1 < recipe.unet_steps:
            ema.store(trained)
            ema.copy_to(trained)
            checkpoint[1](step + 1, _weights(components))
            ema.restore(trained)
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

    from safetensors.torch import save_file

    from dropkiln.stages.models.refs import file_sha256

    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes several in a per-process random (hash) order.
    metadata = {"dropkiln.recipe": json.dumps(recipe.recorded(), sort_keys=True)}
    save_file(dict(sorted(state.items())), str(path), metadata=metadata)
    return file_sha256(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tiny-shapes.safetensors"))
    parser.add_argument(
        "--checkpoint-every", type=int, default=0,
        help="also write the weights every N UNet steps, as OUT's name with -stepN",
    )  # fmt: skip
    defaults = Recipe()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in vars(defaults)})

    def save_checkpoint(step: int, state: dict[str, torch.Tensor]) -> None:
        path = args.out.with_name(f"{args.out.stem}-step{step}{args.out.suffix}")
        print(f"checkpoint {path}, sha256 {save_weights(state, path, recipe)}", flush=True)

    every = args.checkpoint_every
    state = train(recipe, checkpoint=(every, save_checkpoint) if every else None)
    digest = save_weights(state, args.out, recipe)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.1f} MB), sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
