"""Reading a prompt file: parsing its text, expanding ``prompts`` lists and ``vary`` matrices,
filling defaults from the settings, and checking every field and referenced file, with a
message naming the file, the entry and the field.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from dropkiln.options import DeviceClass, GenerateSettings
from dropkiln.stages.base import StageError
from dropkiln.stages.generation.prompt_file import (
    MAX_IMAGES,
    PROMPT_SUFFIXES,
    FileModel,
    ImageDefaults,
    ImageEntry,
    LoraRef,
    PromptFile,
    VideoOptions,
)

M = TypeVar("M", bound=BaseModel)
MAX_PROMPT_FILE_BYTES = 4_000_000
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
