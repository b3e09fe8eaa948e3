"""Prompt files (.toml, .json, .txt): validated models, the loader, and expansion into images.

Everything is checked before anything runs, and a problem is reported as a ``StageError``
naming the file, the entry (``image[2]``, 0-based like the list it is) and the field.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dropkiln.options import DeviceClass, GenerateSettings
from dropkiln.stages.base import StageError
from dropkiln.stages.generation.schedulers import SCHEDULER_NAMES

M = TypeVar("M", bound=BaseModel)

PROMPT_SUFFIXES = (".toml", ".json", ".txt")
MAX_SEED = 2**63 - 1
MAX_IMAGES = 10_000
MAX_PROMPT_FILE_BYTES = 4_000_000
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


VaryKey = Literal[
    "prompt", "negative", "seed", "steps", "guidance", "width", "height", "scheduler", "clip_skip"
]


class EntryMatrix(FileModel):
    """An entry's ``prompts`` list and ``vary`` table: one entry written, many rendered."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=20_000)]] | None = Field(
        None, min_length=1, max_length=MAX_IMAGES
    )
    vary: dict[VaryKey, Annotated[list[Any], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _prompt_once(self) -> EntryMatrix:
        if self.prompts is not None and "prompt" in self.vary:
            raise ValueError("give the prompts either as prompts or in vary, not both")
        return self


def expand_entry(entry: dict[str, Any], label: str, where: str) -> list[dict[str, Any]]:
    """An ``[[image]]`` table as the entries it stands for: one per prompt of ``prompts``
    and per combination of ``vary`` values (the product, keys in sorted order). A varied
    entry's name gains ``key-value`` parts, so its outputs keep their names however the
    table is written."""
    matrix_keys = {"prompts", "vary"}
    if not matrix_keys & entry.keys():
        return [entry]
    matrix = _checked(EntryMatrix, {k: entry[k] for k in matrix_keys & entry.keys()}, label,
                      where, {})  # fmt: skip
    base = {k: v for k, v in entry.items() if k not in matrix_keys}
    axes: list[tuple[str, list[Any]]] = sorted(matrix.vary.items())
    if matrix.prompts is not None:
        if "prompt" in base:
            raise StageError(f"{label}: {where}prompts: give prompt or prompts, not both")
        axes.insert(0, ("prompt", list(matrix.prompts)))
    for key, _ in axes:
        if key in base and key != "prompt":
            raise StageError(f"{label}: {where}vary.{key}: also set directly; set it once")
    entries = [base]
    for key, values in axes:
        entries = [{**e, key: value} for e in entries for value in values]
    named = [key for key, _ in axes if key not in ("prompt", "seed")]
    if named:
        for e in entries:
            parts = [f"{key}-{_name_part(e[key])}" for key in named]
            e["name"] = "-".join(([base["name"]] if base.get("name") else []) + parts)
    return entries


def _name_part(value: Any) -> str:
    text = str(value).lower()
    cleaned = "".join(c if c.isalnum() or c == "." else "-" for c in text).strip("-.")
    return cleaned[:24] or "x"


class _RawFile(FileModel):
    """The top level as written; entries are checked one by one afterwards."""

    model: Annotated[str, Field(min_length=1)] | None = None
    vae: Annotated[str, Field(min_length=1)] | None = None
    device_class: DeviceClass | None = None
    loras: list[LoraRef] = Field(default_factory=list)
    defaults: dict[str, Any] = Field(default_factory=dict)
    image: list[dict[str, Any]] = Field(default_factory=list)
    video: VideoOptions | None = None


def load_prompt_file(path: Path, settings: GenerateSettings) -> PromptFile:
    """Read and validate a prompt file; a ``StageError`` says what is wrong and where.

    ``settings`` (dropkiln.toml's ``[generate]``) give the defaults under the file's own."""
    path = Path(path)
    label = path.name
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise StageError(f"{label}: not a prompt file (expected {', '.join(PROMPT_SUFFIXES)})")
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise StageError(f"{label}: larger than {MAX_PROMPT_FILE_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{label}: cannot be read: {exc}") from exc
    raw = _parse_text(text, path.suffix.lower(), label)
    return _validate(raw, label, path.parent, settings)


def _parse_text(text: str, suffix: str, label: str) -> Any:
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
        entries = [{"prompt": p} for p in prompts if p and not p.startswith("#")]
        if not entries:
            raise StageError(f"{label}: no prompts (one prompt a line; # starts a comment)")
        return {"image": entries}
    try:
        return tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StageError(f"{label}: not valid TOML: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise StageError(f"{label}: not valid JSON: {exc}") from exc


def _validate(raw: Any, label: str, folder: Path, settings: GenerateSettings) -> PromptFile:
    if not isinstance(raw, dict):
        raise StageError(f"{label}: the top level must be a table/object")
    context = {"max_pixels": settings.max_pixels}
    top = _checked(_RawFile, raw, label, "", context)
    if not top.image:
        raise StageError(f"{label}: no [[image]] entries")
    base = _checked(
        ImageDefaults, _settings_defaults(settings), f"{label}: dropkiln.toml", "generate.", {}
    )
    merged_defaults = base.model_dump() | top.defaults
    defaults = _checked(ImageDefaults, merged_defaults, label, "defaults.", context)
    images = []
    expanded = [
        (number, one)
        for number, entry in enumerate(top.image)
        for one in expand_entry(entry, label, f"image[{number}].")
    ]
    if len(expanded) > MAX_IMAGES:
        raise StageError(f"{label}: {len(expanded):,} entries in all; at most {MAX_IMAGES:,}")
    for number, entry in expanded:
        where = f"image[{number}]."
        fields = defaults.model_dump() | entry
        image = _checked(ImageEntry, fields, label, where, context)
        if image.control is not None:
            several = isinstance(entry.get("control"), list)
            controls = []
            for position, control in enumerate(image.control):
                field = f"{label}: {where}control" + (f"[{position}]" if several else "")
                resolved = _resolve_image(control.image, folder, f"{field}.image")
                controls.append(control.model_copy(update={"image": resolved}))
            image = image.model_copy(update={"control": controls})
        if image.init_image is not None:
            image = _resolve_img2img(image, folder, f"{label}: {where}")
        if image.reference is not None:
            several = isinstance(entry.get("reference"), list)
            references = []
            for position, reference in enumerate(image.reference):
                field = f"{label}: {where}reference" + (f"[{position}]" if several else "")
                resolved = _resolve_image(reference.image, folder, f"{field}.image")
                references.append(reference.model_copy(update={"image": resolved}))
            image = image.model_copy(update={"reference": references})
        images.append(image)
    total = sum(image.count for image in images)
    if total > MAX_IMAGES:
        raise StageError(f"{label}: {total:,} images in all; at most {MAX_IMAGES:,} per file")
    video = top.video
    if video is not None and video.audio is not None:
        if video.format != "mp4":
            raise StageError(f"{label}: video.audio: only an mp4 has sound (format {video.format})")
        audio = _resolve_file(video.audio, folder, f"{label}: video.audio")
        video = video.model_copy(update={"audio": audio})
    prompt_file = PromptFile(
        model=top.model,
        vae=top.vae,
        device_class=top.device_class,
        loras=top.loras,
        defaults=defaults,
        images=images,
        video=video,
    )
    _check_video(prompt_file, label)
    return prompt_file


def _settings_defaults(g: GenerateSettings) -> dict[str, Any]:
    return {
        "steps": g.steps,
        "guidance": g.guidance,
        "width": g.width,
        "height": g.height,
        "scheduler": g.scheduler,
        "seed": g.seed,
    }


def _checked(model: type[M], data: Any, label: str, where: str, context: dict[str, Any]) -> M:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise StageError(_describe(exc, model, label, where)) from None


def _describe(exc: ValidationError, model: type[BaseModel], label: str, where: str) -> str:
    problems = []
    for error in exc.errors(include_url=False)[:3]:
        # a dict key's own error is located at "[key]" below it: the key is enough
        parts = [p for p in error["loc"] if p != "[key]"]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
        field = f"{where}{loc.lstrip('.')}".rstrip(".") or "(top level)"
        if error["type"] == "extra_forbidden":
            message = f"unknown key{_did_you_mean(str(error['loc'][-1]), model)}"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error and error["type"] not in ("missing", "model_type", "value_error"):
                message += f" (got {error['input']!r:.60})"
        problems.append(f"{field}: {message}")
    more = len(exc.errors()) - len(problems)
    suffix = f" (and {more} more)" if more > 0 else ""
    return f"{label}: " + "; ".join(problems) + suffix


def _did_you_mean(key: str, model: type[BaseModel]) -> str:
    known = list(model.model_fields)
    if model is _RawFile:
        known = [*known, *ImageDefaults.model_fields]
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve_img2img(image: ImageEntry, folder: Path, where: str) -> ImageEntry:
    """``init_image`` and ``mask`` resolved beside the prompt file, and checked to fit: the
    init image is the entry's size, the mask single-channel and the init image's size."""
    from PIL import Image

    assert image.init_image is not None
    init = _resolve_image(image.init_image, folder, f"{where}init_image")
    with Image.open(init) as img:
        size = img.size
    if size != (image.width, image.height):
        raise StageError(
            f"{where}init_image: {image.init_image!r} is {size[0]}x{size[1]}, the entry is "
            f"{image.width}x{image.height} (set width and height to the image's size)"
        )
    update = {"init_image": init}
    if image.mask is not None:
        mask = _resolve_image(image.mask, folder, f"{where}mask")
        with Image.open(mask) as img:
            mode, mask_size = img.mode, img.size
        if mode not in ("L", "1"):
            raise StageError(
                f"{where}mask: {image.mask!r} has {mode} pixels; a mask is single-channel "
                "(grayscale: white is repainted, black kept)"
            )
        if mask_size != size:
            raise StageError(
                f"{where}mask: {image.mask!r} is {mask_size[0]}x{mask_size[1]}, the init_image "
                f"is {size[0]}x{size[1]}"
            )
        update["mask"] = mask
    return image.model_copy(update=update)


def _resolve_file(name: str, folder: Path, field: str) -> str:
    """A file path confined to the prompt file's folder, absolute, and present."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise StageError(f"{field}: {name!r} must be relative to the prompt file's folder")
    base = folder.resolve()
    resolved = (base / name).resolve()
    if not resolved.is_relative_to(base):
        raise StageError(f"{field}: {name!r} leaves the prompt file's folder")
    if not resolved.is_file():
        raise StageError(f"{field}: {name!r} does not exist beside the prompt file")
    return str(resolved)


def _resolve_image(image: str, folder: Path, field: str) -> str:
    """An image path confined to the prompt file's folder, absolute, and readable."""
    if PurePosixPath(image).is_absolute() or PureWindowsPath(image).anchor:
        raise StageError(f"{field}: {image!r} must be relative to the prompt file's folder")
    base = folder.resolve()
    resolved = (base / image).resolve()
    if not resolved.is_relative_to(base):
        raise StageError(f"{field}: {image!r} leaves the prompt file's folder")
    if not resolved.is_file():
        raise StageError(f"{field}: {image!r} does not exist beside the prompt file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(resolved) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise StageError(f"{field}: {image!r} is not a readable image ({exc})") from exc
    return str(resolved)


def _check_video(prompt_file: PromptFile, label: str) -> None:
    video = prompt_file.video
    if video is None or video.kind != "latent-walk":
        return
    if sum(image.count for image in prompt_file.images) < 2:
        raise StageError(f"{label}: video.kind: a latent walk needs at least two images")
    first = prompt_file.images[0]
    for number, image in enumerate(prompt_file.images):
        if (image.width, image.height) != (first.width, first.height):
            raise StageError(
                f"{label}: image[{number}].width: a latent walk needs one size for all images "
                f"({image.width}x{image.height} differs from {first.width}x{first.height})"
            )
        if image.control is not None:
            raise StageError(
                f"{label}: image[{number}].control: not supported with a latent-walk video"
            )
        if image.init_image is not None:
            raise StageError(
                f"{label}: image[{number}].init_image: not supported with a latent-walk video"
            )
        if image.reference is not None:
            raise StageError(
                f"{label}: image[{number}].reference: not supported with a latent-walk video"
            )
