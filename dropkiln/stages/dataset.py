"""Reading a dropped dataset folder: its images, captions and dataset.toml (a zipped
dataset is extracted first, by ``dataset_zip``).

Folder rules (the same for listing, hashing and bucketing):

- Images are found at the top level and in subfolders, sorted by relative path, so the
  order never depends on the filesystem.
- Hidden files and folders (a leading dot, e.g. ``.DS_Store``, AppleDouble ``._x.jpg``)
  and ``__MACOSX`` folders are ignored.
- No link is ever followed, wherever it points (even at a file of the same dataset: a copy
  costs nothing, and "inside" checked before reading could change before the read). Ingest
  refuses a dataset with a link in it; a link that appears later (the dropper may still
  write to ``processed/ID-NAME``) makes that one file rejected. Stages open dataset files
  with ``open_dataset_file``: every folder on the way and the file itself with
  ``O_NOFOLLOW``, relative to the dataset folder's descriptor, so no swap races the check.
- Captions are same-stem ``.txt`` (preferred) or ``.caption`` files in UTF-8 (a BOM is
  allowed). A caption that is not UTF-8 rejects its image instead of guessing an encoding:
  tags decoded with the wrong code page would train the wrong tokens without a word.
  Whitespace and line breaks collapse to single spaces. No caption means an empty one.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import os
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from dropkiln.options import BucketSettings, DeviceClass, TrainSettings
from dropkiln.stages.base import StageError

OPTIONS_FILE = "dataset.toml"
CAPTION_SUFFIXES = (".txt", ".caption")
IMAGE_SUFFIXES = frozenset(
    {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".webp", ".gif", ".bmp"}
    | {".tif", ".tiff", ".avif", ".tga", ".ppm", ".pgm", ".pbm", ".pnm"}
)
IGNORED_FOLDERS = frozenset({"__MACOSX"})
_READ_CHUNK = 64 * 2**20

DAEMON_LIMITS = frozenset({"max_pixels", "max_caption_bytes", "max_file_bytes", "workers"})
"""Bucket settings that guard the daemon; only dropkiln.toml may change them."""

SectionT = TypeVar("SectionT", bound=BaseModel)


class CaptionError(Exception):
    """The caption file cannot be used; the message is the reason its image is rejected."""


class UnsafeFile(Exception):
    """A dataset file that is not read: a link, not a regular file, or too large."""


def open_dataset_file(folder: Path, relative: str) -> int:
    """A read-only descriptor of the regular file ``folder/relative``, reached without
    following a link: the folder, each subfolder and the file are opened ``O_NOFOLLOW``,
    each relative to the one before. UnsafeFile if any of them is a link or the file is
    not a regular file (a FIFO would block a reader forever)."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise UnsafeFile(f"{relative} is not a path inside the dataset")
    folder_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        directory = os.open(folder, folder_flags)
    except OSError as exc:
        raise _unsafe(exc, folder.name) from exc
    try:
        for depth, part in enumerate(parts[:-1]):
            try:
                inner = os.open(part, folder_flags, dir_fd=directory)
            except OSError as exc:
                raise _unsafe(exc, "/".join(parts[: depth + 1])) from exc
            os.close(directory)
            directory = inner
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(parts[-1], flags, dir_fd=directory)
        except OSError as exc:
            raise _unsafe(exc, relative) from exc
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFile(f"{relative} is not a regular file; not read")
    return fd


def read_dataset_file(folder: Path, relative: str, max_bytes: int) -> bytes:
    """The bytes of a dataset file (``open_dataset_file``), refused above ``max_bytes``
    before anything is read."""
    fd = open_dataset_file(folder, relative)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise UnsafeFile(f"{size} bytes, over max_file_bytes={max_bytes}; not read")
        chunks, total = [], 0
        while chunk := handle.read(min(max(size, 1), _READ_CHUNK)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew while being read
                raise UnsafeFile(f"over max_file_bytes={max_bytes}; not read")
    return b"".join(chunks)


def _unsafe(exc: OSError, name: str) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnsafeFile(f"{name} is a symbolic link; dropkiln does not follow links")
    return exc


@dataclass(frozen=True)
class DatasetFiles:
    """What a dataset folder holds, each list sorted by relative path."""

    images: list[Path]
    others: list[Path]
    """Neither image, caption nor dataset.toml: not used, reported to the user."""
    links: list[Path]
    """Symbolic links (to files or folders): never followed, reported to the user."""


def scan_dataset(folder: Path) -> DatasetFiles:
    """List a dataset folder's image files, its files that are not used and its links."""
    images: list[Path] = []
    others: list[Path] = []
    links: list[Path] = []
    for path in _dataset_files(folder, links):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        elif suffix not in CAPTION_SUFFIXES and path.relative_to(folder) != Path(OPTIONS_FILE):
            others.append(path)
    return DatasetFiles(images, others, sorted(links))


def find_images(folder: Path) -> list[Path]:
    """Image files of a dataset folder and its subfolders, sorted by relative path."""
    return scan_dataset(folder).images


def caption_path(image_path: Path) -> Path | None:
    """The caption file of an image (same stem, .txt before .caption), if there is one."""
    for suffix in CAPTION_SUFFIXES:
        candidate = image_path.with_suffix(suffix)
        if candidate.is_file() or candidate.is_symlink():
            return candidate
    return None


def read_caption(image_path: Path, max_bytes: int, folder: Path | None = None) -> str:
    """The caption of an image ("" without one); CaptionError if it cannot be used.

    With ``folder`` (the dataset folder ``image_path`` is in), the caption is opened as
    every dataset file a stage reads is: without following links."""
    path = caption_path(image_path)
    if path is None:
        return ""
    try:
        if folder is None:
            with open(path, "rb") as handle:
                raw = handle.read(max_bytes + 1)
        else:
            fd = open_dataset_file(folder, path.relative_to(folder).as_posix())
            with os.fdopen(fd, "rb") as handle:
                raw = handle.read(max_bytes + 1)
    except UnsafeFile as exc:
        raise CaptionError(f"caption {path.name}: {exc}") from exc
    except OSError as exc:
        raise CaptionError(f"caption {path.name} is unreadable: {exc.strerror}") from exc
    if len(raw) > max_bytes:
        size = path.lstat().st_size
        raise CaptionError(
            f"caption {path.name} is {size} bytes, over max_caption_bytes={max_bytes}"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(
            f"caption {path.name} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset"
            f" {exc.start}); save it as UTF-8"
        ) from exc
    if "\x00" in text:
        raise CaptionError(f"caption {path.name} contains NUL characters: not a text file")
    return " ".join(text.split())


class DatasetOptions(NamedTuple):
    """What a dataset trains with: dropkiln.toml defaults, then its dataset.toml."""

    model: str
    bucket: BucketSettings
    train: TrainSettings
    vae: str = ""
    device_class: str | None = None
    """Its GPU jobs run only on executors of this class (``[executor] device_class``)."""


def load_dataset_options(folder: Path, defaults: DatasetOptions) -> DatasetOptions:
    """A dataset's options: ``defaults`` (the daemon's, from dropkiln.toml) overridden by its
    dataset.toml."""
    path = folder / OPTIONS_FILE
    if not path.is_file():
        return DatasetOptions(
            defaults.model,
            defaults.bucket.model_copy(),
            defaults.train.model_copy(),
            defaults.vae,
            defaults.device_class,
        )
    table = _read_toml(path)
    model = defaults.model
    vae = defaults.vae
    device_class = defaults.device_class
    bucket_overrides: dict[str, object] = {}
    train_overrides: dict[str, object] = {}
    for key, value in table.items():
        if key == "model":
            if not isinstance(value, str) or not value.strip():
                raise StageError(f"{path}: model should be a non-empty string, got {value!r}")
            model = value.strip()
        elif key == "vae":
            if not isinstance(value, str):
                raise StageError(
                    f"{path}: vae should be a string (a .safetensors path), got {value!r}"
                )
            vae = value.strip()
        elif key == "device_class":
            device_class = _device_class(value, path)
        elif key in DAEMON_LIMITS:
            raise StageError(
                f"{path}: {key!r} is a daemon limit; set it in dropkiln.toml [bucket], not here"
            )
        elif key in BucketSettings.model_fields:
            bucket_overrides[key] = value
        elif key in TrainSettings.model_fields:
            train_overrides[key] = value
        else:
            raise StageError(_unknown_key_message(path, key))
    bucket = _override(defaults.bucket, bucket_overrides, path)
    train = _override(defaults.train, train_overrides, path)
    if bucket.min_side > bucket.max_side:
        raise StageError(
            f"{path}: min_side ({bucket.min_side}) is larger than max_side ({bucket.max_side})"
        )
    return DatasetOptions(model, bucket, train, vae, device_class)


_DEVICE_CLASS = TypeAdapter(DeviceClass)


def _device_class(value: object, path: Path) -> str:
    if not isinstance(value, str):
        raise StageError(f'{path}: device_class should be a string (e.g. "24gb"), got {value!r}')
    try:
        return _DEVICE_CLASS.validate_python(value)
    except ValidationError:
        raise StageError(
            f"{path}: device_class should be a name of letters, digits and . _ : + - "
            f'(e.g. "24gb"), got {value!r}'
        ) from None


def dataset_hash(folder: Path) -> str:
    """sha256 over the sorted relative paths and bytes of every file the dataset uses."""
    digest = hashlib.sha256()
    for path in _dataset_files(folder):
        name = path.relative_to(folder).as_posix()
        with os.fdopen(open_dataset_file(folder, name), "rb") as handle:
            content = hashlib.file_digest(handle, "sha256").digest()
        relative = name.encode()
        digest.update(len(relative).to_bytes(8, "big") + relative + content)
    return digest.hexdigest()


def _dataset_files(folder: Path, links: list[Path] | None = None) -> Iterator[Path]:
    """Every used regular file under folder (hidden and junk skipped), sorted by relative path;
    links (never followed) are left out, or put in ``links``."""
    if not folder.is_dir():
        raise StageError(f"dataset folder {folder} does not exist or is not a folder")
    found: list[tuple[str, Path]] = []
    for directory, subfolders, names in os.walk(folder, followlinks=False):
        subfolders[:] = [
            name for name in subfolders if not name.startswith(".") and name not in IGNORED_FOLDERS
        ]
        for name in [*names, *(d for d in subfolders if Path(directory, d).is_symlink())]:
            path = Path(directory, name)
            if name.startswith(".") or name in IGNORED_FOLDERS:
                continue
            if path.is_symlink():
                if links is not None:
                    links.append(path)
            elif path.is_file():
                found.append((path.relative_to(folder).as_posix(), path))
    found.sort()
    return (path for _, path in found)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StageError(f"{path}: not UTF-8 (byte offset {exc.start})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StageError(f"{path}: malformed TOML: {exc}") from exc


def _unknown_key_message(path: Path, key: str) -> str:
    if key in ("bucket", "train", "generate"):
        return f"{path}: unknown key {key!r}: keys are flat (write steps = 2000, not [train])"
    known = ["model", "vae", *BucketSettings.model_fields, *TrainSettings.model_fields]
    known = [name for name in known if name not in DAEMON_LIMITS]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown key {key!r}{hint}"


def _override(base: SectionT, overrides: dict[str, object], path: Path) -> SectionT:
    if not overrides:
        return base.model_copy()
    try:
        # Strict: "1024" for resolution or "yes" for random_crop is a mistake, not a value.
        return type(base).model_validate({**base.model_dump(), **overrides}, strict=True)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            given = overrides.get(str(error["loc"][0]), error.get("input"))
            problems.append(f"{key}: {error['msg']} (got {given!r})")
        raise StageError(f"{path}: " + "; ".join(problems)) from exc
