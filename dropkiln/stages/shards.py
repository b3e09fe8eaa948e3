"""Content-addressed safetensors shards: the key names the inputs, a hash guards the bytes.

A shard is written atomically and carries the sha256 of its tensors in its header, so a
truncated file (safetensors refuses it) or flipped bits (the hash differs) are caught on
read and the caller re-encodes instead of training on garbage.

Reading is two steps. ``fetch`` reads the file and checks its hash from the raw bytes,
without torch, so a prefetch thread can do it without starting a second OpenMP pool in
the process (DESIGN.md: all torch work on one thread per device); ``tensors`` makes the
tensors on the thread that uses them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
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


_TORCH_DTYPES = {
    # safetensors' dtype names, and torch's, as tensors_sha256 spells them
    "F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16",
    "BF16": "torch.bfloat16", "I64": "torch.int64", "I32": "torch.int32",
    "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8", "BOOL": "torch.bool",
}  # fmt: skip


@dataclass(frozen=True)
class FetchedShard:
    """A shard's file, read and verified, not yet made into tensors."""

    relative: str
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def _verified(relative: str, key: str, data: bytes) -> FetchedShard:
    """The file's header names ``key`` and its tensors' bytes match the sha256 it carries."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        body = memoryview(data)[8 + length :]
        metadata = header.pop("__metadata__", None) or {}
        digest = hashlib.sha256()
        for name in sorted(header):
            entry = header[name]
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= len(body):
                raise ValueError(f"tensor {name} lies outside the file")
            shape = tuple(int(n) for n in entry["shape"])
            digest.update(f"{name}:{_TORCH_DTYPES[entry['dtype']]}:{shape}".encode())
            digest.update(body[start:end])
    except Exception as exc:
        raise CorruptShard(f"{relative} is unreadable: {exc}") from exc
    if metadata.get("dropkiln.key") != key:
        raise CorruptShard(f"{relative} holds another key")
    if metadata.get("dropkiln.sha256") != digest.hexdigest():
        raise CorruptShard(f"{relative} does not match its hash")
    return FetchedShard(relative, data)


def tensors(shard: FetchedShard) -> dict[str, torch.Tensor]:
    """The tensors of a fetched shard (their own memory: the file may be replaced later)."""
    from safetensors.torch import load

    try:
        return load(shard.data)
    except Exception as exc:
        raise CorruptShard(f"{shard.relative} is unreadable: {exc}") from exc


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

    def fetch(self, relative: str, key: str) -> FetchedShard:
        """The shard's file, verified; raises CorruptShard. Uses no torch (any thread)."""
        try:
            data = (self.root / relative).read_bytes()
        except FileNotFoundError as exc:
            raise CorruptShard(f"{relative} is missing") from exc
        except OSError as exc:
            raise CorruptShard(f"{relative} is unreadable: {exc}") from exc
        return _verified(relative, key, data)

    def read(self, relative: str, key: str) -> dict[str, torch.Tensor]:
        """The shard's tensors, verified; raises CorruptShard."""
        return tensors(self.fetch(relative, key))

    def is_intact(self, kind: str, key: str) -> bool:
        try:
            self.fetch(self.relative(kind, key), key)  # verified; no tensors needed
        except CorruptShard:
            return False
        return True
