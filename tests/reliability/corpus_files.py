"""Makers of bad (and awkward but good) files for the bad-input corpus."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def picture(
    size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (200, 60, 40)
) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    return image


def png_bytes(image: Image.Image | None = None, **save: object) -> bytes:
    buffer = io.BytesIO()
    (image or picture()).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width``×``height``: 100 bytes that would
    need tens of gigabytes once decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64, 9)  # a few rows' worth; a decoder would ask for more
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", rows)
        + _chunk(b"IEND", b"")
    )


def broken_crc_png() -> bytes:
    """A PNG with one flipped bit in its pixel data (the IDAT chunk's CRC no longer matches)."""
    data = bytearray(png_bytes())
    idat = data.index(b"IDAT")
    data[idat + 12] ^= 0x10
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return jpeg_bytes(picture().convert("CMYK"))


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    return png_bytes(Image.fromarray(ramp))


def exif_rotated_jpeg() -> bytes:
    """Stored 96 wide × 64 high; EXIF orientation 6 says: turn it upright to 64×96."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(picture((96, 64)), exif=exif)


def multipage_tiff() -> bytes:
    buffer = io.BytesIO()
    first, second = picture(colour=(10, 200, 10)), picture(colour=(10, 10, 200))
    first.save(buffer, format="TIFF", save_all=True, append_images=[second])
    return buffer.getvalue()


def float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(
        buffer, format="TIFF"
    )
    return buffer.getvalue()


def animated_gif() -> bytes:
    buffer = io.BytesIO()
    frames = [picture(colour=(200, 0, 0)), picture(colour=(0, 200, 0)), picture(colour=(0, 0, 200))]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def transparent_png() -> bytes:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=(40, 80, 220, 255))
    return png_bytes(image)


def good_dataset(folder: Path, images: int = 2, seed: int = 0) -> Path:
    """A small usable dataset (different ``seed``, different bytes)."""
    folder.mkdir(parents=True)
    for number in range(images):
        colour = ((seed * 67 + number * 40) % 256, 120, (seed * 13) % 256)
        (folder / f"img{number}.png").write_bytes(png_bytes(picture(colour=colour)))
        (folder / f"img{number}.txt").write_text(f"a shape, colour {seed}-{number}")
    return folder


def write_zip(
    path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None
) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return path
