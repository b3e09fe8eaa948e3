"""The hashes other tools know a checkpoint by, and which file(s) they are taken over.

A1111 and Civitai find a checkpoint by the sha256 of its file ("AutoV2" is its first 10 hex
digits); kohya writes that full sha256 as ``ss_new_sd_model_hash`` and A1111's old 8-hex
hash (sha256 of the 64 KiB at offset 1 MiB) as ``ss_sd_model_hash``.

A diffusers folder, and the tiny built-ins (which are diffusers folders), has no single file
those tools would know. dropkiln hashes its UNet weights instead: the part a LoRA is trained
against, so two folders with the same UNet get the same hash whatever their other files.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dropkiln.stages.base import StageError

if TYPE_CHECKING:
    from dropkiln.stages.models.refs import ModelRef

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
_CHUNK = 1 << 22

_memo_lock = threading.Lock()
_memo: dict[tuple[tuple[str, int, int], ...], CheckpointHashes] = {}


@dataclass(frozen=True)
class CheckpointHashes:
    sha256: str
    """sha256 of the checkpoint bytes (of the files in order when there are several)."""
    legacy: str
    """A1111's old ``model_hash``: sha256 of 64 KiB at offset 1 MiB of the first file, 8 hex."""

    @property
    def autov2(self) -> str:
        return self.sha256[:10]


def checkpoint_files(ref: ModelRef) -> list[Path]:
    """The file(s) whose bytes stand for the model: the single file, or the UNet weights."""
    if ref.single_file:
        return [ref.path]
    unet = ref.path / "unet"
    whole = unet / "diffusion_pytorch_model.safetensors"
    # one file; else the shards of a sharded UNet in name order; else a variant (fp16, …)
    for files in (
        [whole] if whole.is_file() else [],
        sorted(unet.glob("diffusion_pytorch_model-*-of-*.safetensors")),
        sorted(unet.glob("diffusion_pytorch_model.*.safetensors"))[:1],
    ):
        if files:
            return files
    raise StageError(f"model folder {ref.path} has no unet/*.safetensors weights to hash")


def checkpoint_hashes(ref: ModelRef) -> CheckpointHashes:
    """The hashes of ``checkpoint_files(ref)``, computed once per (path, size, mtime)."""
    files = checkpoint_files(ref)
    key = tuple(_identity(path) for path in files)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    value = CheckpointHashes(digest.hexdigest(), legacy_model_hash(files[0]))
    with _memo_lock:
        _memo[key] = value
    return value


def legacy_model_hash(path: Path) -> str:
    """A1111's original ``model_hash`` (kohya's ``ss_sd_model_hash``)."""
    with open(path, "rb") as handle:
        handle.seek(LEGACY_OFFSET)
        return hashlib.sha256(handle.read(LEGACY_LENGTH)).hexdigest()[:8]


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
