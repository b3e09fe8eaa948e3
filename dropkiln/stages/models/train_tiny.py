"""Train ``tiny-shapes`` from its seeded init on procedurally drawn scenes.

    python -m dropkiln.stages.models.train_tiny --out tiny-shapes.safetensors

Three phases, all seeded: the VAE learns to reconstruct scenes (its loss weighted toward the
shape, decoding the posterior mean); the text encoders learn to tell the caption words apart
(shapes_text); then the UNet learns the noise-prediction loss on the VAE's latent means of a
fixed set of scenes, conditioned on the captions through the text encoders, which keep
learning alongside it. With the defaults the file it writes is the one the package ships;
torch's CPU kernels give the same bits for the same build, CPU features and thread count.
``--checkpoint-every`` also writes the weights part-way; the learning rate never depends on
the run's length, so each is byte for byte the file of a run stopped there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.models.shapes_model import COMPONENTS, SHAPES_WORDS, shapes_architecture
from dropkiln.stages.models.shapes_scenes import SIZE, draw_scene, random_scene
from dropkiln.stages.models.shapes_text import separate_caption_words

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Recipe:
    """Every knob of a training run; the defaults made the shipped weights."""

    seed: int = 1
    threads: int = 1
    vae_steps: int = 500
    vae_batch: int = 8
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    shape_weight: float = 8.0
    text_steps: int = 300
    text_batch: int = 32
    text_lr: float = 2e-3
    scenes: int = 6000
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    unet_lr_decay_after: int = 1000
    text_encoder_lr: float = 3e-4
    uncond_probability: float = 0.1
    min_snr_gamma: float = 5.0


def train(
    recipe: Recipe, log: Any = sys.stdout, checkpoint: Checkpoint | None = None
) -> dict[str, torch.Tensor]:
    """The trained weights as one ``component.tensor`` state dict (plus the VAE's scale).

    ``checkpoint`` (every, callback) hands the callback the weights after every ``every``
    UNet steps; nothing in the run depends on ``unet_steps`` but its length, so the weights
    after step n are the ones a run with ``unet_steps=n`` returns."""
    import numpy as np
    import torch

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.Generator(np.random.PCG64(recipe.seed))
    generator = torch.Generator().manual_seed(recipe.seed)
    components = shapes_architecture()
    started = time.monotonic()
    _train_vae(components["vae"], recipe, rng, log)
    print(f"vae trained in {time.monotonic() - started:.0f} s", file=log, flush=True)
    print(f"vae reconstructions read back: {_vae_readback(components['vae'])}", file=log)
    pipe = shapes_pipeline(components)
    text_steps = (recipe.text_steps, recipe.text_batch, recipe.text_lr)
    separate_caption_words(pipe, text_steps, lambda: random_scene(rng), log)
    latents, captions = _encode_scenes(components["vae"], recipe, rng)
    scaling = float(1.0 / latents.std())
    components["vae"].register_to_config(scaling_factor=scaling)
    _train_unet(components, recipe, latents, captions, generator, log, checkpoint)
    print(f"trained in {time.monotonic() - started:.0f} s", file=log, flush=True)
    return _weights(components)


Checkpoint = tuple[int, Callable[[int, dict[str, "torch.Tensor"]], None]]
"""(every so many UNet steps, a callback taking the step count and the weights so far)."""


def _weights(components: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch

    state: dict[str, torch.Tensor] = {}
    for key in COMPONENTS:
        for name, tensor in components[key].state_dict().items():
            state[f"{key}.{name}"] = tensor.detach().float().clone().contiguous()
    scaling = float(components["vae"].config.scaling_factor)
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


def _train_vae(vae: Any, recipe: Recipe, rng: np.random.Generator, log: Any) -> None:
    import torch

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.vae_steps)
    for step in range(recipe.vae_steps):
        images, _ = scene_batch(rng, recipe.vae_batch)
        posterior = vae.encode(images).latent_dist
        # The mean, not a sample: at this KL weight the posterior's spread stays as wide as
        # its means' (measured: 0.69 against 0.68), and a decoder fed samples learns one
        # average colour per background. The UNet learns these means too.
        reconstruction = vae.decode(posterior.mean).sample
        # The shape covers a few percent of the picture: unweighted, the background's
        # pixels outvote it and the VAE gives back a blob in the background's average colour.
        weights = 1.0 + recipe.shape_weight * shape_mask(images)
        error = (weights * (reconstruction - images).abs()).mean() / weights.mean()
        loss = error + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            line = f"vae {step:5d} reconstruction {error.item():.5f} at {_clock()}"
            print(line, file=log, flush=True)
    vae.eval().requires_grad_(False)


def shape_mask(images: torch.Tensor) -> torch.Tensor:
    """1 where a [-1, 1] scene differs from its background (its border's median), else 0."""
    import torch

    border = torch.cat(
        [images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2
    )
    background = border.median(dim=2).values[:, :, None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > 0.1).float()


def _vae_readback(vae: Any, count: int = 40) -> dict[str, float]:
    """How often the detector reads a held-out scene's attributes off its reconstruction."""
    import numpy as np
    import torch
    from PIL import Image

    from dropkiln.stages.models.shapes_detect import detect

    rng = np.random.Generator(np.random.PCG64(5))
    scenes = [random_scene(rng, held_out=True) for _ in range(count)]
    pixels = np.stack([np.asarray(draw_scene(scene), dtype=np.float32) for scene in scenes])
    with torch.no_grad():
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    right = {"colour": 0, "position": 0, "shape": 0}
    for scene, picture in zip(scenes, decoded, strict=True):
        array = ((picture.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        found = detect(Image.fromarray(array))
        right["colour"] += found.colour == scene.colour
        right["position"] += found.position == scene.position
        right["shape"] += found.shape == scene.shape
    return {name: hits / count for name, hits in right.items()}


def _encode_scenes(
    vae: Any, recipe: Recipe, rng: np.random.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Latent means of a fixed set of scenes, with their captions."""
    import torch

    means, captions = [], []
    with torch.no_grad():
        for start in range(0, recipe.scenes, 250):
            images, texts = scene_batch(rng, min(250, recipe.scenes - start))
            dist = vae.encode(images).latent_dist
            means.append(dist.mean)
            captions += texts
    return torch.cat(means), captions


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
    latents: torch.Tensor,
    captions: list[str],
    generator: torch.Generator,
    log: Any,
    checkpoint: Checkpoint | None = None,
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
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_then_decay(recipe.unet_lr_decay_after)
    )
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


def _warmup_then_decay(decay_after: int, warmup: int = 100) -> Any:
    # No cosine to a planned end: the rate at a step never depends on the run's length, so a
    # checkpoint of a long run is the same file as a shorter run (pick the best, rerun it).
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return min(1.0, (decay_after / max(step, 1)) ** 0.5)

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
    parser.add_argument(
        "--checkpoint-every", type=int, default=0,
        help="also write <out>-<steps>.safetensors every so many UNet steps, each the file a "
        "run with --unet-steps <steps> writes",
    )  # fmt: skip
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in vars(defaults)})
    out: Path = args.out

    def write_checkpoint(steps: int, weights: dict[str, torch.Tensor]) -> None:
        target = out.with_name(f"{out.stem}-{steps}{out.suffix}")
        digest = save_weights(weights, target, replace(recipe, unet_steps=steps))
        print(f"wrote {target}, sha256 {digest}", flush=True)

    every = args.checkpoint_every
    state = train(recipe, checkpoint=(every, write_checkpoint) if every > 0 else None)
    digest = save_weights(state, args.out, recipe)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.1f} MB), sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
