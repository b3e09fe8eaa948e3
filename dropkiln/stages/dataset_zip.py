"""A dataset dropped as a zip, extracted without trusting it: nothing lands outside the
new folder, and bombs, links, encrypted and special entries refuse the whole zip."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from dropkiln.stages.base import StageError
from dropkiln.stages.dataset import IGNORED_FOLDERS

ZIP_MAX_FILES = 20_000
ZIP_MAX_BYTES = 8 * 2**30
ZIP_MAX_RATIO = 200
_RATIO_CHECKED_ABOVE = 2**20  # small entries may compress well; they cannot hurt
_COPY_CHUNK = 2**20


def extract_zip_safely(
    zip_path: Path,
    dest: Path,
    *,
    max_files: int = ZIP_MAX_FILES,
    max_bytes: int = ZIP_MAX_BYTES,
    max_ratio: float = ZIP_MAX_RATIO,
) -> Path:
    """Extract a dataset zip into the new folder ``dest``; return the dataset folder in it.

    Nothing is written outside ``dest``: an entry with an absolute path, a drive letter or
    ``..`` refuses the whole zip, as do links and other special entries, encrypted entries,
    too many files, too many bytes, or a compression ratio typical of zip bombs. The files
    appear in ``dest`` all at once (extracted beside it, then renamed). If everything sits in
    one top folder (``cats/…``), that folder is returned.
    """
    label = zip_path.name
    if dest.exists():
        raise StageError(f"cannot extract {label}: {dest} already exists")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = _checked_members(archive, label, max_files, max_bytes, max_ratio)
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(
                tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unzip", dir=dest.parent)
            )
            try:
                _extract(archive, members, staging, max_bytes, label)
                os.rename(staging, dest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise StageError(f"{label} is damaged or not a zip we can read: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StageError(f"cannot extract {label}: {exc}") from exc
    return _single_top_folder(dest)


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]


def _checked_members(
    archive: zipfile.ZipFile, label: str, max_files: int, max_bytes: int, max_ratio: float
) -> list[_Member]:
    members: list[_Member] = []
    seen: set[tuple[str, ...]] = set()
    total_size = total_compressed = 0
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in parts:
            raise StageError(f"{label}: entry {info.filename!r} would land outside the dataset")
        if not parts or parts[0] in IGNORED_FOLDERS or info.is_dir():
            continue
        file_type = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
        if stat.S_ISLNK(file_type):
            raise StageError(f"{label}: entry {info.filename!r} is a symbolic link; not extracted")
        if file_type not in (0, stat.S_IFREG):
            raise StageError(f"{label}: entry {info.filename!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise StageError(f"{label}: entry {info.filename!r} is encrypted")
        if parts in seen:
            raise StageError(f"{label}: entry {info.filename!r} appears twice")
        seen.add(parts)
        if info.file_size > _RATIO_CHECKED_ABOVE and (
            info.file_size > max_ratio * max(info.compress_size, 1)
        ):
            raise StageError(
                f"{label}: entry {info.filename!r} expands {info.file_size} bytes from"
                f" {info.compress_size} (over {max_ratio:g}:1, a zip bomb?)"
            )
        total_size += info.file_size
        total_compressed += info.compress_size
        members.append(_Member(info, parts))
    if len(members) > max_files:
        raise StageError(f"{label}: {len(members)} files, over the limit of {max_files}")
    if total_size > max_bytes:
        raise StageError(f"{label}: {total_size} bytes uncompressed, over the limit of {max_bytes}")
    if total_size > _RATIO_CHECKED_ABOVE and total_size > max_ratio * max(total_compressed, 1):
        raise StageError(
            f"{label}: expands {total_size} bytes from {total_compressed}"
            f" (over {max_ratio:g}:1, a zip bomb?)"
        )
    return members


def _extract(
    archive: zipfile.ZipFile, members: list[_Member], staging: Path, max_bytes: int, label: str
) -> None:
    root = staging.resolve()
    written = 0
    for member in members:
        target = staging.joinpath(*member.parts)
        if not target.resolve().is_relative_to(root):
            raise StageError(f"{label}: entry {member.info.filename!r} would land outside")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Declared sizes are only claims: count what really comes out.
        with archive.open(member.info) as source, open(target, "xb") as sink:
            entry_bytes = 0
            while chunk := source.read(_COPY_CHUNK):
                entry_bytes += len(chunk)
                written += len(chunk)
                if entry_bytes > member.info.file_size:
                    raise StageError(f"{label}: entry {member.info.filename!r} is over its size")
                if written > max_bytes:
                    raise StageError(f"{label}: more than {max_bytes} bytes uncompressed")
                sink.write(chunk)
            sink.flush()
            os.fsync(sink.fileno())


def _single_top_folder(dest: Path) -> Path:
    entries = [entry for entry in dest.iterdir() if not entry.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest
