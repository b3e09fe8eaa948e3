"""Peak memory during a benchmark: process RSS sampled in a thread, CUDA peaks from torch."""

from __future__ import annotations

import resource
import sys
import threading
from types import TracebackType
from typing import Any

import psutil

SAMPLE_EVERY_S = 0.02


class MemoryWatch:
    """``with MemoryWatch() as watch: …``, then ``watch.report()``.

    RSS is sampled every 20 ms, so a peak shorter than that can be missed; the process's
    lifetime peak (``ru_maxrss``) is reported beside it as an upper bound.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-memory", daemon=True)
        self.start_rss = 0
        self.peak_rss = 0
        self.end_rss = 0

    def __enter__(self) -> MemoryWatch:
        self.start_rss = self.peak_rss = self._rss()
        torch = _cuda_torch(self.device)
        if torch is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.end_rss = self._rss()
        self.peak_rss = max(self.peak_rss, self.end_rss)

    def report(self) -> dict[str, Any]:
        """Bytes: RSS at start, end and peak; CUDA allocated/reserved peaks on a GPU."""
        # Linux reports ru_maxrss in KiB, macOS in bytes.
        scale = 1 if sys.platform == "darwin" else 1024
        figures: dict[str, Any] = {
            "rss_start_bytes": self.start_rss,
            "rss_peak_bytes": self.peak_rss,
            "rss_end_bytes": self.end_rss,
            "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        }
        torch = _cuda_torch(self.device)
        if torch is not None:
            figures["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            figures["cuda_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        return figures

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak_rss = max(self.peak_rss, self._rss())


def _cuda_torch(device: str) -> Any:
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch
