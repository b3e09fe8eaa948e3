"""What a ``model`` setting names: a tiny built-in, a diffusers folder or a single file."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

from dropkiln.stages.base import StageError
from dropkiln.stages.models.single_file import (
    ModelKind,
    Prediction,
    checkpoint_family,
    shipped_config,
)
from dropkiln.stages.models.tiny import TINY_NAMES, TinyName, ensure_tiny_model

_memo_lock = threading.Lock()
_memo: dict[tuple[str, int, int, bool], str] = {}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: family, where its weights are, and a hash of those weights."""

    name: str
    kind: ModelKind
    path: Path
    fingerprint: str
    single_file: bool = False
    config_dir: Path | None = None
    """A single file's component configs (shipped with dropkiln)."""
    prediction: Prediction = "epsilon"
    zero_terminal_snr: bool = False
    vae: Path | None = None
    """A standalone VAE file used in place of the model's own (the ``vae`` setting)."""


def resolve_model(
    ref: str, models_dir: Path, config_root: Path | None = None, vae: str | None = None
) -> ModelRef:
    """Turn ``model`` (and ``vae``) settings into a ModelRef; StageError for anything unknown.

    ``config_root`` replaces the shipped single-file configs (the miniature checkpoints of
    the tests have the real topology at small widths)."""
    model = _resolve_weights(ref, Path(models_dir), config_root)
    if not vae:
        return model
    from dropkiln.stages.models.vae import vae_layout

    path = Path(vae).expanduser()
    try:
        vae_layout(path)
    except StageError as exc:
        raise StageError(f"vae {vae!r}: {exc}") from None
    path = path.resolve()
    digest = hashlib.sha256(f"{model.fingerprint}+vae:{file_sha256(path)}".encode()).hexdigest()
    return replace(model, fingerprint=digest, vae=path)


def _resolve_weights(ref: str, models_dir: Path, config_root: Path | None) -> ModelRef:
    if ref in TINY_NAMES:
        folder = ensure_tiny_model(cast(TinyName, ref), models_dir)
        return _folder_ref(ref, folder)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise StageError(f"model folder {path} is not a diffusers folder (no model_index.json)")
        return _folder_ref(ref, path.resolve())
    if path.is_file():
        if path.suffix != ".safetensors":
            raise StageError(
                f"model file {path} is not a .safetensors checkpoint "
                "(pickled .ckpt/.bin files are never loaded)"
            )
        return _single_file_ref(ref, path.resolve(), config_root)
    raise StageError(
        f"unknown model {ref!r}: expected {' or '.join(TINY_NAMES)}, a local diffusers folder "
        "or a local .safetensors file"
    )


def _folder_ref(name: str, folder: Path) -> ModelRef:
    index = json.loads((folder / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    if "XL" in cls or "text_encoder_2" in index:
        kind: ModelKind = "sdxl"
    elif cls.startswith("StableDiffusion"):
        kind = "sd15"
    else:
        raise StageError(f"model folder {folder} holds a {cls or 'unknown'} pipeline, not SD/SDXL")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".txt"))
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise StageError(f"model folder {folder} has no .safetensors weights")
    return ModelRef(name, kind, folder, _fingerprint(folder, files))


def _single_file_ref(name: str, path: Path, config_root: Path | None) -> ModelRef:
    family = checkpoint_family(path)
    return ModelRef(
        name,
        family.kind,
        path,
        _fingerprint(path.parent, [path]),
        single_file=True,
        config_dir=shipped_config(family.kind, config_root),
        prediction=family.prediction,
        zero_terminal_snr=family.zero_terminal_snr,
    )


def checkpoint_kind(path: Path) -> ModelKind:
    """SDXL or SD 1.5, from the tensor names in a single-file checkpoint's header."""
    return checkpoint_family(path).kind


def _fingerprint(base: Path, files: list[Path]) -> str:
    """sha256 over relative names and content hashes; content hashes memoised by size+mtime."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(base)).encode() + b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Content hash of a file; a multi-GB checkpoint is hashed once per (size, mtime)."""
    return _memoised_sha256(path, data_only=False)


def safetensors_data_sha256(path: Path) -> str:
    """The hash A1111 and Civitai give a LoRA ("AutoV3"): sha256 of the safetensors data
    section, not of the header, which holds training times (the same weights trained twice
    hash alike). Memoised like ``file_sha256``."""
    return _memoised_sha256(path, data_only=True)


def _memoised_sha256(path: Path, data_only: bool) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, data_only)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if data_only:
            header = int.from_bytes(handle.read(8), "little")
            # Not safetensors after all (loading it will say so): hash all of it.
            handle.seek(8 + header if 8 + header <= stat.st_size else 0)
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    value = digest.hexdigest()
    with _memo_lock:
        _memo[key] = value
    return value
