"""PNG files with their parameters embedded, the contact sheet, and latent previews."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from dropkiln.stages.base import write_atomic
from dropkiln.stages.generation.prompt_file import ImageTask
from dropkiln.stages.generation.schedulers import a1111_sampler

if TYPE_CHECKING:
    import torch

PARAMETERS_KEY = "parameters"
DROPKILN_KEY = "dropkiln"
THUMB_SIDE = 192
SHEET_COMPRESS_LEVEL = 1
MIN_CELL_SIDE = 128
"""Small images are scaled up to this, so a wrapped label has room beneath them."""
LABEL_LINE_HEIGHT = 12
LABEL_MAX_LINES = 3
LABEL_MARGIN = 3


def a1111_parameters(
    task: ImageTask, model_name: str, model_sha256: str, loras: Sequence[dict[str, Any]]
) -> str:
    """The ``parameters`` text A1111 writes (and A1111, Civitai and others read back).

    ``model_sha256`` is the checkpoint file's sha256; A1111 and Civitai find a checkpoint by
    its first 10 hex digits ("AutoV2").
    """
    prompt = task.prompt + "".join(
        f" <lora:{lora_tag_name(lo['name'])}:{lo['weight']:g}>" for lo in loras
    )
    fields: list[tuple[str, Any]] = [
        ("Steps", task.steps),
        ("Sampler", a1111_sampler(task.scheduler)),
        ("CFG scale", f"{task.guidance:g}"),
        ("Seed", task.seed),
        ("Size", f"{task.width}x{task.height}"),
        ("Model hash", model_sha256[:10]),
        ("Model", model_name),
    ]
    if task.clip_skip is not None:
        fields.append(("Clip skip", task.clip_skip))
    for number, control in enumerate(task.control or []):
        # A1111 numbers its units when there are several
        key = f"ControlNet {number}" if len(task.control or []) > 1 else "ControlNet"
        fields.append((key, f"{control.model}: {control.scale:g}"))
    if loras:
        hashes = ", ".join(f"{lora_hash_name(lo['name'])}: {lo['sha256'][:12]}" for lo in loras)
        fields.append(("Lora hashes", hashes))
    fields.append(("Version", "dropkiln"))
    return infotext(prompt, task.negative, fields)


def infotext(prompt: str, negative: str, fields: Sequence[tuple[str, Any]]) -> str:
    """Prompt lines, ``Negative prompt:`` lines, then one line of ``key: value`` pairs."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in fields))
    return "\n".join(lines)


def _quoted(value: Any) -> str:
    # A1111's rule: a value holding a separator is JSON-encoded, non-ASCII kept as is;
    # its reader splits the settings line on commas and decodes values in double quotes.
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def model_label(name: str) -> str:
    """``tiny-sdxl``, or a folder's or file's stem: what A1111's ``Model:`` shows."""
    if "/" in name or "\\" in name:
        return PureWindowsPath(name).stem if "\\" in name else PurePosixPath(name).stem
    return name


def lora_label(name: str) -> str:
    """A LoRA's name as people see it: a path shows as its file's stem."""
    if "/" in name or "\\" in name or name.endswith(".safetensors"):
        return PureWindowsPath(name).stem if "\\" in name else PurePosixPath(name).stem
    return name


def lora_tag_name(name: str) -> str:
    """The name inside ``<lora:NAME:WEIGHT>``: no ``:``, ``<``, ``>`` or line breaks."""
    label = lora_label(name)
    for character in ":<>":
        label = label.replace(character, "")
    return " ".join(label.split("\n"))


def lora_hash_name(name: str) -> str:
    """The name in ``Lora hashes``: A1111 drops commas and colons from it."""
    return lora_label(name).replace(",", "").replace(":", "")


def png_info(parameters: str, record: dict[str, Any]) -> PngInfo:
    """The text chunks: ``parameters`` (tEXt, iTXt if not Latin-1) and ``dropkiln`` (JSON)."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    info.add_text(DROPKILN_KEY, json.dumps(record, sort_keys=True, ensure_ascii=True))
    return info


def write_png(
    image: Image.Image, target: Path, info: PngInfo | None = None, compress_level: int = 6
) -> Path:
    """Save a PNG atomically; the same pixels and chunks always give the same bytes."""
    return write_atomic(target, png_bytes(image, info, compress_level))


def png_bytes(image: Image.Image, info: PngInfo | None = None, compress_level: int = 6) -> bytes:
    """The PNG file ``write_png`` writes, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG (``parameters``, ``dropkiln``, …)."""
    with Image.open(path) as img:
        img.load()
        return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}


def read_dropkiln_record(path: Path) -> dict[str, Any] | None:
    """The ``dropkiln`` JSON chunk of a PNG, or None when there is none or it is unreadable."""
    try:
        text = read_png_text(path).get(DROPKILN_KEY)
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def sheet_thumbnail(image: Image.Image) -> Image.Image:
    """What the contact sheet needs of ``image``: itself if it fits a cell, else scaled down
    to THUMB_SIDE (the sheet's cells are never larger, so the sheet comes out the same)."""
    picture = image.convert("RGB")  # a copy: the caller may go on using its image
    if max(picture.size) <= THUMB_SIDE:
        return picture
    return ImageOps.contain(picture, (THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)


def contact_sheet(
    images: Sequence[Path | Image.Image], labels: Sequence[str], target: Path
) -> Path:
    """A grid of thumbnails (small images scaled up to the cell) with labels wrapped inside
    their cells, written atomically. An image is given in memory (its ``sheet_thumbnail``,
    when the caller has just written it) or as a file to read."""
    pictures = []
    for image in images:
        if isinstance(image, Image.Image):
            pictures.append(sheet_thumbnail(image))
            continue
        with Image.open(image) as img:
            pictures.append(sheet_thumbnail(img))
    side = min(THUMB_SIDE, max((max(p.size) for p in pictures), default=THUMB_SIDE))
    side = max(side, MIN_CELL_SIDE)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_label(label, font, measure, side - 2 * LABEL_MARGIN) for label in labels]
    lines = max((len(w) for w in wrapped), default=1)
    columns = max(1, math.ceil(math.sqrt(len(pictures))))
    rows = max(1, math.ceil(len(pictures) / columns))
    cell_w, cell_h = side, side + lines * LABEL_LINE_HEIGHT + 2
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for number, (picture, label_lines) in enumerate(zip(pictures, wrapped, strict=True)):
        x, y = (number % columns) * cell_w, (number // columns) * cell_h
        thumb = ImageOps.contain(picture, (side, side), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
        for row, line in enumerate(label_lines):
            position = (x + LABEL_MARGIN, y + side + 1 + row * LABEL_LINE_HEIGHT)
            draw.text(position, line, fill=(220, 220, 220), font=font)
    # An overview, not an output: zlib's fastest level takes a quarter of the time of the
    # default (about 45 ms for a 3x3 sheet, 8 % of a small batched job on the CPU).
    return write_png(sheet, target, compress_level=SHEET_COMPRESS_LEVEL)


def wrap_label(label: str, font: Any, draw: ImageDraw.ImageDraw, width: int) -> list[str]:
    """``label`` in at most LABEL_MAX_LINES lines no wider than ``width`` pixels; words
    too long for a line are cut, and text past the last line ends in an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in label.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = _fit(word, font, draw, width)
    if current or not lines:
        lines.append(current)
    if len(lines) > LABEL_MAX_LINES:
        last = " ".join(lines[LABEL_MAX_LINES - 1 :])
        lines = [*lines[: LABEL_MAX_LINES - 1], _fit(last + "…", font, draw, width, "…")]
    return lines


def _fit(text: str, font: Any, draw: ImageDraw.ImageDraw, width: int, end: str = "") -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[: -1 - len(end)] + end
    return text


# Linear maps from latent channels to RGB, fitted by the community for quick previews
# (as in ComfyUI's latent previewer): good enough to see a composition forming.
SD15_LATENT_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                   (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))  # fmt: skip
SDXL_LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                   (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))  # fmt: skip


def latent_preview(latents: torch.Tensor, is_xl: bool, side: int = 128) -> Image.Image:
    """A small RGB approximation of a latent, without running the VAE."""
    import torch

    latent = latents[0].detach().to("cpu", torch.float32)
    if latent.shape[0] == 4:
        factors = torch.tensor(SDXL_LATENT_RGB if is_xl else SD15_LATENT_RGB)
        rgb = torch.einsum("chw,cr->rhw", latent, factors)
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    else:
        rgb = latent[:3] if latent.shape[0] >= 3 else latent[:1].repeat(3, 1, 1)
        low, high = rgb.min(), rgb.max()
        rgb = (rgb - low) / (high - low + 1e-6)
    array = (rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array)
    scale = max(1, side // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
