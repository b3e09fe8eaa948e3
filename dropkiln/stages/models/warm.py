"""Warm pipelines: a loaded model stays in memory between jobs within a RAM budget."""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dropkiln.stages.models.loading import load_pipeline, pipeline_bytes
from dropkiln.stages.models.refs import ModelRef

if TYPE_CHECKING:
    import torch

DEFAULT_RAM_BUDGET = 8 * 1024**3

Loader = Callable[[ModelRef, str, Any], Any]
CacheKey = tuple[str, str, str, str]


@dataclass
class _Entry:
    pipeline: Any
    nbytes: int


class PipelineCache:
    """Loaded pipelines keyed by (model, device, dtype), least recently used evicted first.

    A pipeline larger than the whole budget is still kept, alone, so back-to-back jobs on
    one big model never reload it.
    """

    def __init__(self, ram_budget_bytes: int = DEFAULT_RAM_BUDGET, loader: Loader | None = None):
        self.ram_budget_bytes = ram_budget_bytes
        self.loads = 0
        self.evictions = 0
        self._loader: Loader = loader or load_pipeline
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, ref: ModelRef, device: str, dtype: torch.dtype) -> Any:
        """The pipeline for ``ref``, loading it only if it is not warm."""
        key = (ref.fingerprint, str(ref.path), device, str(dtype))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry.pipeline
            pipeline = self._loader(ref, device, dtype)
            self.loads += 1
            self._entries[key] = _Entry(pipeline, pipeline_bytes(pipeline))
            self._evict_beyond_budget(device)
            return pipeline

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            devices = {key[2] for key in self._entries}
            self._entries.clear()
        for device in devices:
            _release(device)

    def _evict_beyond_budget(self, device: str) -> None:
        evicted = False
        while len(self._entries) > 1 and self.resident_bytes > self.ram_budget_bytes:
            self._entries.popitem(last=False)
            self.evictions += 1
            evicted = True
        if evicted:
            _release(device)


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


_shared: PipelineCache | None = None
_shared_lock = threading.Lock()


def shared_pipelines() -> PipelineCache:
    """The process-wide warm cache the stages use (configure it once at daemon start)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PipelineCache()
        return _shared


def configure_shared_pipelines(ram_budget_bytes: int) -> PipelineCache:
    """Set the warm cache's RAM budget (Settings.ram_budget_gb); keeps what is loaded."""
    cache = shared_pipelines()
    with cache._lock:
        cache.ram_budget_bytes = ram_budget_bytes
        if cache._entries:
            cache._evict_beyond_budget(next(reversed(cache._entries))[2])
    return cache
