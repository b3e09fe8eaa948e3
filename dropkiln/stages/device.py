"""Device choice, memory snapshots and release; the same code on CUDA and on the CPU."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import psutil

from dropkiln.stages.oom import is_out_of_memory as is_out_of_memory


def resolve_device(requested: str = "auto") -> str:
    """``auto`` becomes ``cuda`` when a GPU is usable, else ``cpu``."""
    if requested != "auto":
        return requested
    if not any(Path("/dev").glob("nvidia[0-9]*")) and "torch" not in sys.modules:
        return "cpu"  # no NVIDIA device node: skip the multi-second torch import
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return f"CPU ({psutil.cpu_count(logical=True)} threads)"


def memory_snapshot(device: str) -> dict[str, int | str]:
    """Allocated, reserved, peak and device free/total in bytes; RAM figures on the CPU."""
    process = psutil.Process(os.getpid())
    rss: int = process.memory_info().rss
    snap: dict[str, int | str] = {"device": device, "rss": rss}
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        free, total = torch.cuda.mem_get_info(dev)
        snap.update(
            allocated=torch.cuda.memory_allocated(dev),
            reserved=torch.cuda.memory_reserved(dev),
            peak=torch.cuda.max_memory_allocated(dev),
            free=free,
            total=total,
        )
    else:
        vm = psutil.virtual_memory()
        snap.update(
            allocated=rss,
            reserved=rss,
            peak=_peak_rss(),
            free=vm.available,
            total=vm.total,
        )
    return snap


def _peak_rss() -> int:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


def release_memory(device: str) -> None:
    """Drop what the failed attempt held: Python garbage, then the CUDA caching allocator."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
