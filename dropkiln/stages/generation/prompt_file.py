"""Prompt files (.toml, .json, .txt): the validated models, and their expansion into images
(``prompt_loading`` reads and checks a file into them).

Everything is checked before anything runs, and a problem is reported as a ``StageError``
naming the file, the entry (``image[2]``, 0-based like the list it is) and the field.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dropkiln.stages.generation.schedulers import SCHEDULER_NAMES

PROMPT_SUFFIXES = (".toml", ".json", ".txt")
MAX_SEED = 2**63 - 1
MAX_IMAGES = 10_000
MAX_BATCH = 64


class FileModel(BaseModel):
    """A table of a prompt file: unknown keys and coerced types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LoraRef(FileModel):
    """A LoRA asked for by name (a trained dataset, a job id or a path) and its weight."""

    name: Annotated[str, Field(min_length=1, max_length=4096)]
    weight: float = Field(1.0, ge=-10, le=10)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `loras = ["cats"]` means weight 1.0
        return {"name": value} if isinstance(value, str) else value


class ControlRef(FileModel):
    """A control image for one entry; ``image`` is absolute once the file is loaded."""

    image: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)] = "tiny"
    scale: float = Field(0.8, ge=0, le=5)
    start: float = Field(0.0, ge=0, le=1)
    """The share of the denoising steps before this ControlNet starts to act."""
    end: float = Field(1.0, ge=0, le=1)
    """The share of the denoising steps after which it stops."""
    preprocess: Literal["none", "canny"] = "none"
    """``canny``: the control image is a photo; its Canny edges are the control."""

    @model_validator(mode="after")
    def _starts_before_it_ends(self) -> ControlRef:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start:g}) must be before end ({self.end:g})")
        return self


MAX_CONTROLS = 4


class ReferenceRef(FileModel):
    """A reference image (IP-Adapter) for one entry; ``image`` is absolute once loaded."""

    image: Annotated[str, Field(min_length=1)]
    weight: float = Field(0.6, ge=0, le=2)
    """How strongly the image steers (diffusers' IP-Adapter scale; 0: not at all)."""
    adapter: Annotated[str, Field(min_length=1)] = "tiny"
    """``tiny`` (with the tiny models) or an IP-Adapter .safetensors file under
    state/models, with its ``image_encoder/`` folder beside it."""


MAX_REFERENCES = 4


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8 (got {value})")
    return value


Side = Annotated[int, Field(ge=8, le=16384)]


class ImageDefaults(FileModel):
    """The ``[defaults]`` table: every image field except the prompt, all resolved."""

    negative: str = ""
    seed: int = Field(1, ge=0, le=MAX_SEED)
    count: int = Field(1, ge=1, le=1000)
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(5.0, ge=0, le=50)
    width: Side = 1024
    height: Side = 1024
    scheduler: str = "euler"
    clip_skip: int | None = Field(None, ge=1, le=12)
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    """Images of the same settings per pipeline call (unset: the memory rung decides)."""

    @field_validator("width", "height")
    @classmethod
    def _sides(cls, value: int) -> int:
        return _multiple_of_8(value)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        name = value.strip().lower()
        if name not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {value!r}; known: {', '.join(SCHEDULER_NAMES)}")
        return name

    @model_validator(mode="after")
    def _within_max_pixels(self, info: ValidationInfo) -> ImageDefaults:
        max_pixels = (info.context or {}).get("max_pixels")
        if max_pixels is not None and self.width * self.height > max_pixels:
            raise ValueError(
                f"size {self.width}x{self.height} is over max_pixels ({max_pixels:,} pixels)"
            )
        return self


class ImageEntry(ImageDefaults):
    """One ``[[image]]`` entry with the defaults filled in."""

    prompt: Annotated[str, Field(min_length=1, max_length=20_000)]
    name: str | None = None
    control: Annotated[list[ControlRef], Field(min_length=1, max_length=MAX_CONTROLS)] | None = None
    """One ControlNet (a table) or several at once (a list of tables)."""
    init_image: Annotated[str, Field(min_length=1)] | None = None
    """img2img: the starting image beside the prompt file (absolute once loaded)."""
    strength: float = Field(0.75, ge=0, le=1)
    """img2img/inpainting: how much of ``init_image`` is noised away (1: all of it)."""
    mask: Annotated[str, Field(min_length=1)] | None = None
    """Inpainting: a single-channel image, white where ``init_image`` is repainted."""
    reference: (
        Annotated[list[ReferenceRef], Field(min_length=1, max_length=MAX_REFERENCES)] | None
    ) = None
    """Reference images (IP-Adapter), one table or a list, each with its own weight."""

    @field_validator("control", "reference", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict | ControlRef | ReferenceRef) else value

    @field_validator("reference")
    @classmethod
    def _one_adapter(cls, value: list[ReferenceRef] | None) -> list[ReferenceRef] | None:
        # diffusers holds one image encoder per pipeline: the references share an adapter
        if value is not None and len({reference.adapter for reference in value}) > 1:
            raise ValueError("every reference of an entry must name the same adapter")
        return value

    @model_validator(mode="after")
    def _image_inputs_fit_together(self) -> ImageEntry:
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask: needs an init_image to paint into")
        if self.init_image is not None and self.control is not None:
            raise ValueError("init_image: not supported together with control")
        return self

    @field_validator("name")
    @classmethod
    def _stays_in_output_folder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value or value.strip() != value:
            raise ValueError("must be a non-empty name without surrounding spaces")
        parts = (PurePosixPath(value), PureWindowsPath(value))
        if any(p.is_absolute() or len(p.parts) != 1 or p.anchor for p in parts):
            raise ValueError(f"{value!r} would leave the output folder (no paths, just a name)")
        if value.startswith(".") or "\x00" in value or len(value) > 100:
            raise ValueError(f"{value!r} is not a usable file name")
        return value

    @model_validator(mode="after")
    def _seeds_in_range(self) -> ImageEntry:
        if self.seed + self.count - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} + count {self.count} runs past {MAX_SEED}")
        return self


class VideoOptions(FileModel):
    """The ``[video]`` table."""

    kind: Literal["slideshow", "latent-walk"] = "slideshow"
    fps: int = Field(12, ge=1, le=120)
    seconds_per_image: float = Field(1.5, gt=0, le=600)
    transition: Literal["crossfade", "cut"] = "crossfade"
    motion: Literal["none", "ken-burns"] = "none"
    """slideshow: ``ken-burns`` pans and zooms across each image while it is shown."""
    zoom: float = Field(1.2, ge=1, le=4)
    """ken-burns: how far each image is zoomed in by the end of its time on screen."""
    interpolate: int = Field(0, ge=0, le=15)
    """latent walk: blended frames put between each two rendered ones (a smoother video at a
    higher fps for the same rendering cost)."""
    audio: Annotated[str, Field(min_length=1)] | None = None
    """mp4: a sound file beside the prompt file (absolute once loaded)."""
    audio_fit: Literal["cut", "loop"] = "cut"
    """``cut``: the video ends with a shorter sound; ``loop``: the sound repeats to the end."""
    frames: int = Field(48, ge=2, le=10_000, description="latent walk: frames in all")
    loop: bool = False
    format: Literal["mp4", "gif", "webp"] = "mp4"


class PromptFile(FileModel):
    """A validated prompt file: every entry complete, control images resolved."""

    model: str | None = None
    vae: str | None = None
    device_class: str | None = Field(None, exclude=True)
    """Where its GPU jobs run (``[executor] device_class``), not what they render: left out
    of the spec the jobs carry."""
    loras: list[LoraRef] = Field(default_factory=list)
    defaults: ImageDefaults = Field(default_factory=ImageDefaults)
    images: list[ImageEntry] = Field(min_length=1)
    video: VideoOptions | None = None


class ImageTask(FileModel):
    """One image to render: an entry's n-th image with its own seed and output stem."""

    index: int
    entry: int
    stem: str
    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    clip_skip: int | None = None
    control: list[ControlRef] | None = None
    init_image: str | None = None
    strength: float = 0.75
    mask: str | None = None
    reference: list[ReferenceRef] | None = None
    batch_size: int | None = None
    """How many images to render per call, not what an image depicts (left out of digests)."""


def expand_jobs(prompt_file: PromptFile) -> list[ImageTask]:
    """Entries × count as concrete images: seeds seed, seed+1, …; stems ``NNN-SEED[-NAME]``."""
    tasks: list[ImageTask] = []
    for entry_index, entry in enumerate(prompt_file.images):
        for offset in range(entry.count):
            seed = entry.seed + offset
            index = len(tasks)
            stem = f"{index:03d}-{seed}" + (f"-{entry.name}" if entry.name else "")
            tasks.append(
                ImageTask(
                    index=index,
                    entry=entry_index,
                    stem=stem,
                    seed=seed,
                    **entry.model_dump(exclude={"count", "name", "seed"}),
                )
            )
    return tasks
