"""Dataset pixels: decode an image to plain 8-bit RGB, plan its bucket and crop, apply it.

The bucket stage calls :func:`decode_rgb` to prove an image is readable and to learn its
size, then plans it with :func:`bucket_sizes`, :func:`choose_bucket` and :func:`plan_crop`;
the cache stage calls :func:`decode_rgb` again and :func:`crop_to_bucket` with the
manifest's plan, so both see exactly the same pixels.

Decoding choices, in the order they are applied:

- Only still-image formats are opened (``DATASET_FORMATS``); Pillow is never asked to guess
  among all its plugins (EPS would run Ghostscript).
- The size from the header is checked against ``max_pixels`` *before* any pixel is decoded;
  Pillow's own decompression-bomb error (or its warning, where warnings are errors) is a
  rejection too.
- Animated images (GIF, WebP, APNG) and multi-page TIFFs: the first frame is used and a
  note says so. A dataset image is one picture; silently averaging or picking a "best"
  frame would surprise more than it helps.
- EXIF orientation is applied, so sizes and crops are in the upright picture's pixels.
- An embedded ICC profile other than sRGB is converted to sRGB (an unreadable profile is
  ignored with a note).
- Grayscale, palette, CMYK and YCbCr become RGB; 16-bit grayscale ("I;16*", and "I",
  read as 16-bit data) is scaled to 8 bits, not clipped; alpha (RGBA, LA, PA, palette
  transparency) is composited over white.
- 32-bit float images (mode "F") are rejected: there is no agreed range to map.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image, ImageCms, ImageOps

from dropkiln.options import BucketSettings
from dropkiln.stages.base import StageError

DATASET_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "TGA", "PPM")
"""Pillow formats a dataset image may be in (detected from the bytes, not the suffix).

JPEG includes MPO (multi-picture JPEGs from phones and cameras); PNG includes APNG."""

Size = tuple[int, int]
"""(width, height) in pixels."""

WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class ImageRejected(Exception):
    """This file cannot be used as a dataset image; the message is the user-facing reason."""


@dataclass
class DecodedImage:
    """An upright 8-bit RGB picture and what was done to get it."""

    image: Image.Image
    source_format: str
    source_mode: str
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def decode_rgb(data: bytes, max_pixels: int) -> DecodedImage:
    """Fully decode image bytes to upright RGB, or raise ImageRejected with the reason."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    image = _open_checked(data, max_pixels)
    source_format = image.format or "unknown"
    source_mode = image.mode
    notes: list[str] = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"{frames} frames ({source_format}): the first frame is used")
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb guard: {exc}") from exc
    except Exception as exc:
        raise ImageRejected(f"cannot decode {source_format} data: {_describe(exc)}") from exc
    image = _upright(image, notes)
    image = _to_srgb(image, notes)
    return DecodedImage(_to_rgb(image, notes), source_format, source_mode, notes)


def crop_to_bucket(
    image: Image.Image, resized_size: tuple[int, int], crop_box: tuple[int, int, int, int]
) -> Image.Image:
    """Resize to cover the bucket, then cut the planned crop box (both from the manifest)."""
    if image.size != resized_size:
        image = image.resize(resized_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image.crop(crop_box)


def bucket_sizes(settings: BucketSettings) -> list[Size]:
    """Every bucket (width, height) the settings allow, widest aspect ratio last."""
    step = settings.bucket_step
    area = settings.resolution**2
    low = -(-settings.min_side // step) * step
    high = settings.max_side // step * step
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(area // width // step * step, high)
        if height >= low:
            sizes.add((width, height))
    if not sizes:
        raise StageError(
            f"no bucket fits resolution {settings.resolution} with sides from"
            f" {settings.min_side} to {settings.max_side} in steps of {step}"
        )
    return sorted(sizes, key=lambda size: (Fraction(*size), size))


def choose_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket nearest in aspect ratio to an image of this (width, height)."""
    width, height = size

    def distance(bucket: Size) -> tuple[Fraction, int, int]:
        # |log(bucket ratio) - log(image ratio)|, compared exactly as a ratio ≥ 1.
        wide, tall = bucket[0] * height, bucket[1] * width
        return (Fraction(max(wide, tall), min(wide, tall)), -bucket[0] * bucket[1], bucket[0])

    return min(buckets, key=distance)


@dataclass(frozen=True)
class CropPlan:
    bucket: Size
    resized_size: Size
    crop_box: tuple[int, int, int, int]


def plan_crop(size: Size, bucket: Size, random_crop: bool, crop_seed: str) -> CropPlan:
    """Resize (width, height) to cover the bucket; crop the centre or a seeded random box."""
    width, height = size
    bucket_w, bucket_h = bucket
    # Integer rounding (half up) so every machine plans the same pixels.
    if bucket_w * height >= bucket_h * width:
        resized = (bucket_w, max(bucket_h, (2 * height * bucket_w + width) // (2 * width)))
    else:
        resized = (max(bucket_w, (2 * width * bucket_h + height) // (2 * height)), bucket_h)
    spare_w, spare_h = resized[0] - bucket_w, resized[1] - bucket_h
    if random_crop:
        rng = random.Random(crop_seed)
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    return CropPlan(bucket, resized, (left, top, left + bucket_w, top + bucket_h))


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=DATASET_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives as an exception where warnings are errors (tests).
        raise ImageRejected(f"decompression bomb guard: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageRejected(
            "not an image in a supported format (" + ", ".join(DATASET_FORMATS) + ")"
        ) from exc
    except Exception as exc:
        raise ImageRejected(f"cannot read image header: {_describe(exc)}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            f"{width}×{height} = {width * height} pixels is over max_pixels={max_pixels}"
            " (decompression bomb guard)"
        )
    return image


def _upright(image: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        notes.append("EXIF data unreadable: orientation ignored")
        return image
    if orientation in (None, 1):
        return image
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:
        notes.append(f"EXIF orientation {orientation} could not be applied: ignored")
        return image
    notes.append(f"EXIF orientation {orientation} applied")
    return upright


def _to_srgb(image: Image.Image, notes: list[str]) -> Image.Image:
    profile_bytes = image.info.get("icc_profile")
    if not profile_bytes or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(profile_bytes))
        description = ImageCms.getProfileDescription(profile).strip()
        if description.lower().startswith("srgb"):
            return image
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, profile, _SRGB, outputMode=output_mode)
    except Exception:
        notes.append("ICC profile unreadable: colours taken as sRGB")
        return image
    if converted is None:  # only when converting in place, which we never ask for
        return image
    notes.append(f"colours converted from ICC profile {description!r} to sRGB")
    return converted


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        notes.append(f"{mode} grayscale scaled to 8 bits")
        return _sixteen_bit_to_rgb(image)
    if mode == "F":
        raise ImageRejected("32-bit float pixels (mode F) are not supported")
    if mode == "P":
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        return _over_white(image.convert("RGBA"), notes)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageRejected(f"pixel mode {mode} cannot be converted to RGB") from exc


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    eight_bit = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def _over_white(rgba: Image.Image, notes: list[str]) -> Image.Image:
    alpha_low, _ = rgba.getchannel("A").getextrema()
    if alpha_low == 255:
        return rgba.convert("RGB")
    notes.append("transparent pixels composited over white")
    background = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    return message or type(exc).__name__
