"""The bad-input corpus: each case is one entry, a builder and the outcome it must have.

Drop cases (corpus_datasets.py, corpus_prompts.py) are dropped one by one into
drop/datasets or drop/prompts. Image cases (here) are
problems inside an otherwise good dataset: they all go into one dataset, ``mixed``, whose
bucket job must succeed and list each of them as rejected (with its reason) or accepted
(normalised, with the note that says how).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tests.reliability import corpus_files as f


@dataclass(frozen=True)
class Rejected:
    """The drop lands in drop/failed/ beside NAME.error.txt, whose reason matches."""

    reason: str


@dataclass(frozen=True)
class JobFails:
    """The drop is taken, and its ``stage`` job fails with a reason that matches."""

    stage: str
    reason: str


@dataclass(frozen=True)
class ImageRejected:
    reason: str


@dataclass(frozen=True)
class ImageAccepted:
    mode: str
    """The mode the file was decoded from (the manifest's ``source_mode``)."""
    note: str | None = None
    size: tuple[int, int] = (64, 64)
    """Upright (width, height)."""


@dataclass(frozen=True)
class DropCase:
    name: str
    kind: Literal["dataset", "prompts"]
    build: Callable[[Path], Path]
    """Makes the entry inside the given staging folder and returns it."""
    expect: Rejected | JobFails


@dataclass(frozen=True)
class ImageCase:
    name: str
    build: Callable[[Path, str], str]
    """Writes the files into the dataset folder under the given stem; returns the image's
    path relative to the folder."""
    expect: ImageRejected | ImageAccepted


# Image cases ---------------------------------------------------------------------------------


def _image(
    suffix: str, data: Callable[[], bytes], caption: bytes | None = None
) -> Callable[[Path, str], str]:
    def build(folder: Path, stem: str) -> str:
        (folder / f"{stem}{suffix}").write_bytes(data())
        if caption is not None:
            (folder / f"{stem}.txt").write_bytes(caption)
        return f"{stem}{suffix}"

    return build


IMAGE_CASES = [
    ImageCase(
        "truncated-png",
        _image(".png", lambda: f.png_bytes()[:-40]),
        ImageRejected(r"cannot decode PNG data: image file is truncated"),
    ),
    ImageCase(
        "truncated-jpeg",
        _image(".jpg", lambda: f.jpeg_bytes(f.picture())[:-600]),
        ImageRejected(r"cannot decode JPEG data"),
    ),
    ImageCase("zero-bytes", _image(".png", lambda: b""), ImageRejected(r"empty file \(0 bytes\)")),
    ImageCase(
        "text-as-jpeg",
        _image(".jpg", lambda: b"<html><body>not a picture</body></html>\n"),
        ImageRejected(r"not an image in a supported format"),
    ),
    ImageCase(
        "pdf-as-webp",
        _image(".webp", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
        ImageRejected(r"not an image in a supported format"),
    ),
    ImageCase(
        "over-max-pixels",
        _image(".png", lambda: f.png_bytes(f.picture((200, 200)))),
        ImageRejected(r"200×200 = 40000 pixels is over max_pixels=20000"),
    ),
    ImageCase(
        "bomb-header",
        _image(".png", lambda: f.bomb_png(100_000, 100_000)),
        ImageRejected(r"decompression bomb"),
    ),
    ImageCase(
        "bomb-under-pillow-limit",
        _image(".png", lambda: f.bomb_png(12_000, 12_000)),
        ImageRejected(r"12000×12000 = 144000000 pixels is over max_pixels"),
    ),
    ImageCase(
        "broken-crc", _image(".png", f.broken_crc_png), ImageRejected(r"cannot decode PNG data")
    ),
    ImageCase(
        "float-tiff",
        _image(".tif", f.float_tiff),
        ImageRejected(r"32-bit float pixels \(mode F\) are not supported"),
    ),
    ImageCase(
        "latin1-caption",
        _image(".png", f.png_bytes, "café, crème brûlée".encode("latin-1")),
        ImageRejected(r"caption latin1-caption.txt is not UTF-8 \(byte 0xe9"),
    ),
    ImageCase(
        "ten-megabyte-caption",
        _image(".png", f.png_bytes, b"tag, " * 2_000_000),
        ImageRejected(r"caption ten-megabyte-caption.txt is 10000000 bytes, over max_caption"),
    ),
    ImageCase(
        "nul-caption",
        _image(".png", f.png_bytes, b"a\x00b"),
        ImageRejected(r"contains NUL characters"),
    ),
    ImageCase(
        "unknown-type",
        _image(".psd", lambda: b"8BPS\x00\x01" + bytes(64)),
        ImageRejected(r"not used: \.psd is not an image type"),
    ),
    ImageCase("cmyk-jpeg", _image(".jpg", f.cmyk_jpeg), ImageAccepted("CMYK")),
    ImageCase(
        "sixteen-bit-png",
        _image(".png", f.sixteen_bit_png),
        ImageAccepted("I;16", r"I;16 grayscale scaled to 8 bits"),
    ),
    ImageCase(
        "exif-rotated",
        _image(".jpg", f.exif_rotated_jpeg),
        ImageAccepted("RGB", r"EXIF orientation 6 applied", size=(64, 96)),
    ),
    ImageCase(
        "multipage-tiff",
        _image(".tiff", f.multipage_tiff),
        ImageAccepted("RGB", r"2 frames \(TIFF\): the first frame is used"),
    ),
    ImageCase(
        "animated-gif",
        _image(".gif", f.animated_gif),
        ImageAccepted("P", r"3 frames \(GIF\): the first frame is used"),
    ),
    ImageCase(
        "transparent-png",
        _image(".png", f.transparent_png),
        ImageAccepted("RGBA", r"transparent pixels composited over white"),
    ),
]
