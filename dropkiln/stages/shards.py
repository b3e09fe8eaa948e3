"""Content-addressed safetensors shards: the key names the inputs, a hash guards the bytes.

A shard is written atomically and carries the sha256 of its tensors in its header, so a
truncated file (safetensors refuses it) or flipped bits (the hash differs) are caught on
read and the caller re-encodes instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dropkiln.stages.base import write_atomic

if TYPE_CHECKING:
    import torch

SHARD_VERSION = 1


class CorruptShard(Exception):
    """A shard that is missing, unreadable, or whose tensors do not match their hash."""


def shard_key(kind: str, **inputs: object) -> str:
    """sha256 of everything that determines a shard's content."""
    payload = json.dumps({"kind": kind, "version": SHARD_VERSION, **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and raw bytes."""
    import torch  # here, not at the top: the cache stage's module imports this one on lookup

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ShardStore:
    """Shards under ``root/<kind>/<key[:2]>/<key>.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def relative(self, kind: str, key: str) -> str:
        return f"{kind}/{key[:2]}/{key}.safetensors"

    def path(self, kind: str, key: str) -> Path:
        return self.root / self.relative(kind, key)

    def write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> str:
        """Write a shard atomically; returns its path relative to the store."""
        from safetensors.torch import save

        cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        metadata = {"dropkiln.key": key, "dropkiln.sha256": tensors_sha256(cpu)}
        write_atomic(self.path(kind, key), save(cpu, metadata=metadata))
        return self.relative(kind, key)

    def read(self, relative: str, key: str) -> dict[str, torch.Tensor]:
        """The shard's tensors, verified; raises CorruptShard."""
        from safetensors import safe_open

        path = self.root / relative
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                # Copied out of the file's memory map: the file may be replaced later.
                tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}  # noqa: SIM118
        except FileNotFoundError as exc:
            raise CorruptShard(f"{relative} is missing") from exc
        except Exception as exc:
            raise CorruptShard(f"{relative} is unreadable: {exc}") from exc
        if metadata.get("dropkiln.key") != key:
            raise CorruptShard(f"{relative} holds another key")
        if metadata.get("dropkiln.sha256") != tensors_sha256(tensors):
            raise CorruptShard(f"{relative} does not match its hash")
        return tensors

    def is_intact(self, kind: str, key: str) -> bool:
        try:
            self.read(self.relative(kind, key), key)
        except CorruptShard:
            return False
        return True
