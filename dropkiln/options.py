"""What a job runs with: the ``[bucket]``, ``[train]`` and ``[generate]`` tables of
dropkiln.toml, which a dataset.toml or prompt file may override.

A stage's spec carries these, so they live apart from ``Settings``: a stage sees its spec,
never the whole Settings (``dropkiln.config`` imports them from here).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

DeviceClass = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
]
"""A name for the kind of device an executor runs on (``cuda``, ``cpu``, ``24gb``, ``a100``):
a drop that names one runs its GPU jobs only on executors of that class."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BucketSettings(Section):
    resolution: int = Field(1024, ge=64, le=4096, description="bucket area is at most resolution²")
    bucket_step: Literal[32, 64] = 64
    min_side: int = Field(256, ge=32)
    max_side: int = Field(2048, ge=64)
    random_crop: bool = False
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb guard, per image")
    max_caption_bytes: int = Field(64_000, ge=16)
    max_file_bytes: int = Field(
        512 * 2**20, ge=1, description="largest image file read, checked before reading"
    )
    workers: int = Field(0, ge=0, description="decode processes; 0 means one per core")


class TrainSettings(Section):
    steps: int = Field(2000, ge=1, le=10_000_000)
    checkpoint_every: int = Field(250, ge=1)
    keep_loras: int | None = Field(
        None, ge=1, description="per-checkpoint LoRA files kept, newest first (unset: all)"
    )
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    rank: int = Field(16, ge=1, le=1024)
    alpha: float | None = None
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    text_encoder_learning_rate: float | None = None
    train_text_encoder: bool = False
    target_modules: list[str] | Literal["attention", "kohya"] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description='UNet module names, or a preset: "attention", "kohya" (kohya\'s full set)',
    )
    optimizer: Literal["adamw", "adafactor", "prodigy", "soap", "adamw8bit"] = Field(
        "adamw", description="adamw8bit needs CUDA and the [cuda] extra (bitsandbytes)"
    )
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    input_perturbation: float = Field(0.0, ge=0)
    timestep_min: int = Field(0, ge=0)
    timestep_max: int = Field(1000, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 turns it off")
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    flip_augment: bool = False
    shuffle_tags: bool = False
    keep_tokens: int = Field(0, ge=0)
    tag_dropout: float = Field(0.0, ge=0, le=1)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    tag_weights: dict[str, float] = Field(default_factory=dict)
    validation_prompts: list[str] = Field(default_factory=list)
    validation_holdout: int = Field(
        0, ge=0, description="images held out of training for the validation loss"
    )
    wandb_project: str = Field(
        "", description="a Weights & Biases project (needs the [wandb] extra; offline)"
    )
    seed: int = 1


class GenerateSettings(Section):
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(5.0, ge=0, le=50)
    width: int = Field(1024, ge=8)
    height: int = Field(1024, ge=8)
    scheduler: str = "euler"
    seed: int = 1
    max_pixels: int = Field(4096 * 4096, ge=64)
    preview_every: int = Field(0, ge=0, description="write a small preview every N steps (0: off)")
