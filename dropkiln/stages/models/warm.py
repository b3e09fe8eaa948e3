"""Warm pipelines: a loaded model stays in memory between jobs within a RAM budget and,
for pipelines on a GPU, a device-memory budget.

Every stage asks for a model in the device's one weights dtype (``weights_dtype``), so
training, caching and generation share one warm copy per (model, device).
"""

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
    device: str
    label: str


class PipelineCache:
    """Loaded pipelines keyed by (model, device, dtype), least recently used evicted first.

    A pipeline larger than the whole budget is still kept, alone, so back-to-back jobs on
    one big model never reload it.
    """

    def __init__(
        self,
        ram_budget_bytes: int = DEFAULT_RAM_BUDGET,
        loader: Loader | None = None,
        device_budget_bytes: int | None = None,
    ):
        self.ram_budget_bytes = ram_budget_bytes
        self.device_budget_bytes = device_budget_bytes
        """Bytes of warm pipelines kept on GPUs; None: DEVICE_SHARE of the device's memory."""
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
            label = f"{ref.name} on {device} ({str(dtype).removeprefix('torch.')})"
            self._entries[key] = _Entry(pipeline, pipeline_bytes(pipeline), device, label)
            self._evict_beyond_budget(device)
            _freeze_long_lived()
            return pipeline

    @property
    def resident_bytes(self) -> int:
        """Bytes of warm pipelines in RAM (on the CPU)."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if e.device == "cpu")

    def device_bytes(self, device: str) -> int:
        """Bytes of warm pipelines on ``device`` (a GPU)."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if e.device == device)

    def evict_all_but_newest(self, device: str) -> list[str]:
        """Drop every warm pipeline on GPU ``device`` but the one used last (the job that ran
        out of memory was using it); what was dropped, for the OutOfMemory event. On the
        CPU nothing is dropped: RAM is the RAM budget's business."""
        if device == "cpu":
            return []
        with self._lock:
            on_device = [key for key, entry in self._entries.items() if entry.device == device]
            newest = next(reversed(self._entries), None)
            evicted = [self._entries.pop(key) for key in on_device if key != newest]
            self.evictions += len(evicted)
        if evicted:
            _release(device)
        return [entry.label for entry in evicted]

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
        while len(self._entries) > 1 and self._over_budget(device):
            self._entries.popitem(last=False)
            self.evictions += 1
            evicted = True
        if evicted:
            _release(device)

    def _over_budget(self, device: str) -> bool:
        if self.resident_bytes > self.ram_budget_bytes:
            return True
        if device == "cpu":
            return False
        budget = self.device_budget_bytes
        if budget is None:
            budget = int(DEVICE_SHARE * _device_total(device))
        return self.device_bytes(device) > budget


DEVICE_SHARE = 0.75
"""Warm pipelines may fill this share of a GPU by default; the rest is the job's working set."""


def _device_total(device: str) -> int:
    if not device.startswith("cuda"):
        return 2**62  # mps/xpu: no portable total; only the RAM budget applies
    import torch

    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def _freeze_long_lived() -> None:
    """Collect, then take what is left (modules, warm pipelines) out of the cyclic collector's
    sight. With torch and diffusers loaded a full collection walks hundreds of thousands of
    objects (about 100 ms on an idle 2-core box), wherever allocation happens to trigger it:
    in a drop's pickup, in a job's loop. Frozen objects are skipped; a model load, which takes
    seconds, pays for the one collection here."""
    gc.collect()
    gc.freeze()


def _release(device: str) -> None:
    # An evicted pipeline was frozen with the rest: thaw, so its cycles can be collected.
    gc.unfreeze()
    _freeze_long_lived()
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


def configure_shared_pipelines(
    ram_budget_bytes: int, device_budget_bytes: int | None = None
) -> PipelineCache:
    """Set the warm cache's budgets (Settings.ram_budget_gb, device_budget_gb); keeps what
    is loaded within them."""
    cache = shared_pipelines()
    with cache._lock:
        cache.ram_budget_bytes = ram_budget_bytes
        cache.device_budget_bytes = device_budget_bytes
        if cache._entries:
            cache._evict_beyond_budget(next(reversed(cache._entries))[2])
    return cache
