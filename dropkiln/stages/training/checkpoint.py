"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder is built under a temporary name and renamed into place, so a kill
during the write leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from safetensors.torch import load_file, save

from dropkiln.stages.base import fsync_dir, write_file

TENSORS = "tensors.safetensors"
STATE = "state.json"


class RngState(TypedDict, total=False):
    """The global generators' states, as ``capture_global_rng`` takes them."""

    torch: torch.Tensor
    python: tuple[Any, ...]
    numpy: dict[str, Any]
    cuda: list[torch.Tensor]


def flatten(value: object, tensors: dict[str, torch.Tensor], prefix: str) -> object:
    """JSON-safe structure with tensors and arrays moved into ``tensors`` (by name)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": prefix}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: flatten(v, tensors, f"{prefix}.{k}") for k, v in value.items()}}
        return {"__pairs__": [[k, flatten(v, tensors, f"{prefix}.{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint {type(value).__name__} at {prefix}")


def unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten``."""
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(unflatten(v, tensors) for v in value["__tuple__"])
    if "__pairs__" in value:
        return {k: unflatten(v, tensors) for k, v in value["__pairs__"]}
    return {k: unflatten(v, tensors) for k, v in value["__dict__"].items()}


def capture_global_rng(device: str) -> RngState:
    """torch (CPU and CUDA), Python and numpy global RNG states."""
    state: RngState = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: RngState) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts of tensors and plain values) as a checkpoint folder."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(state, tensors, "s")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_file(staging / TENSORS, save(tensors))
        write_file(staging / STATE, json.dumps(structure))
        for name in (TENSORS, STATE):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
        fsync_dir(folder.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The state a checkpoint folder holds; raises OSError/ValueError when it is damaged."""
    tensors = load_file(str(folder / TENSORS))
    structure = json.loads((folder / STATE).read_text())
    result: dict[str, Any] = unflatten(structure, tensors)
    return result


KEEP_CHECKPOINTS = 2
"""The newest checkpoint and the one before it: if the newest turns out damaged (a torn
write, a bad sector), the job goes back one interval instead of to step 0."""


def prune_checkpoints(parent: Path, keep: Path, count: int = KEEP_CHECKPOINTS) -> None:
    """Keep ``keep`` and the newest folders before it, ``count`` in all; remove the rest
    (older ones, a newer one never recorded, half-written staging folders)."""
    if not parent.is_dir():
        return
    older = sorted(
        (
            e
            for e in parent.iterdir()
            if e.is_dir() and not e.name.startswith(".") and e.name < keep.name
        ),
        reverse=True,
    )
    kept = {keep, *older[: count - 1]}
    for entry in parent.iterdir():
        if entry.is_dir() and entry not in kept:
            shutil.rmtree(entry, ignore_errors=True)


def fallback_checkpoints(parent: Path, recorded: str) -> list[str]:
    """The recorded checkpoint, then the older ones still on disk, newest first (relative
    to ``parent``'s parent, as the stage records them)."""
    recorded_name = Path(recorded).name
    older = []
    if parent.is_dir():
        older = sorted(
            (e.name for e in parent.iterdir() if e.is_dir() and not e.name.startswith(".")
             and e.name < recorded_name),
            reverse=True,
        )  # fmt: skip
    return [recorded, *(f"{parent.name}/{name}" for name in older)]
