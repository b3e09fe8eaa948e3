"""Fault injection at named points, so every recovery path runs on machines without a GPU.

``DROPKILN_FAULTS`` is a comma-separated list of ``KIND@POINT[:WHEN]``:

- KIND: ``oom`` raises the real ``torch.OutOfMemoryError``; the ``oom-…`` kinds raise the
  other forms a real allocation failure takes (``OOM_FORMS``: the exception class and
  message CUDA, cuBLAS, cuDNN and the CPU allocators really produce); ``enospc`` (a full
  disk) and ``eio`` (a failing disk) tear the next file write this thread makes: half the
  bytes land, then the write call raises ``OSError(ENOSPC)`` or ``OSError(EIO)``, as a real
  one does part-way through a file; ``kill`` sends SIGKILL to this process; ``crash``
  aborts the process doing the work (``os.abort()``, as a crashing decoder would), which
  for ``bucket.decode`` is the decode worker, not the daemon.
- POINT: a name a stage passes to ``ctx.fault()``, e.g. ``train.step``, ``cache.batch``,
  ``generate.step``, ``generate.decode``, ``bucket.image``, ``video.frame``.
- WHEN: ``N`` fires on the N-th time the point is reached in this process (once);
  ``*`` (or nothing) fires every time; ``N+`` fires every time from the N-th on.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass

OOM_FORMS: dict[str, tuple[str, str]] = {
    # kind: (exception class, message as the library words it)
    "oom-cuda": ("RuntimeError", "CUDA out of memory. Tried to allocate 20.00 MiB"),
    "oom-cuda-error": ("AcceleratorError", "CUDA error: out of memory"),
    "oom-cublas": (
        "RuntimeError",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    ),
    "oom-cudnn": (
        "RuntimeError",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a"
        " non-contiguous input.",
    ),
    "oom-cudnn-alloc": ("RuntimeError", "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "oom-cpu": (
        "RuntimeError",
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate"
        " memory: you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)",
    ),
    "oom-python": ("MemoryError", ""),
}
KINDS = ("oom", *OOM_FORMS, "enospc", "eio", "kill", "crash")
TORN_WRITES = {
    "enospc": (errno.ENOSPC, "No space left on device"),
    "eio": (errno.EIO, "Input/output error"),
}

_torn = threading.local()


def take_torn_write() -> OSError | None:
    """The error an armed ``enospc``/``eio`` fault makes this thread's next write raise (once)."""
    error: OSError | None = getattr(_torn, "error", None)
    _torn.error = None
    return error


def arm_torn_write(error: OSError | None) -> None:
    """Arm ``error`` for this thread's next write: a torn write taken where the fault fired,
    handed to the thread that really writes the file."""
    _torn.error = error


class FaultSpecError(ValueError):
    """The fault string cannot be parsed."""


@dataclass(frozen=True)
class Fault:
    kind: str
    point: str
    first: int  # 1-based hit number it first fires on
    repeat: bool  # keep firing after ``first``

    def fires_on(self, hit: int) -> bool:
        return hit >= self.first if self.repeat else hit == self.first


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, at, rest = item.partition("@")
        if not at or kind not in KINDS or not rest:
            raise FaultSpecError(
                f"bad fault {item!r}: expected KIND@POINT[:N|:N+|:*], KIND in {KINDS}"
            )
        point, _, when = rest.partition(":")
        if when in ("", "*"):
            faults.append(Fault(kind, point, 1, True))
            continue
        repeat = when.endswith("+")
        number = when.removesuffix("+")
        if not number.isdigit() or int(number) < 1:
            raise FaultSpecError(f"bad fault {item!r}: WHEN must be N, N+ or *")
        faults.append(Fault(kind, point, int(number), repeat))
    return faults


class FaultInjector:
    """Counts hits per point across the whole process and fires armed faults."""

    def __init__(self, spec: str = "") -> None:
        self.faults = parse_faults(spec)
        self.hits: dict[str, int] = {}
        self.fired: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.faults)

    def hit(self, point: str) -> None:
        due = self._due(point)
        if due is not None:
            _fire(*due)

    def deferred(self, point: str) -> str | None:
        """Count a hit like ``hit`` but return the fault due (``KIND@POINT (hit N)``) instead of
        firing it, for the caller to fire where the work really runs (``fire``)."""
        due = self._due(point)
        return None if due is None else f"{due[0].kind}@{point} (hit {due[1]})"

    def _due(self, point: str) -> tuple[Fault, int] | None:
        if not self.faults:
            return None
        with self._lock:
            count = self.hits.get(point, 0) + 1
            self.hits[point] = count
            due = [f for f in self.faults if f.point == point and f.fires_on(count)]
            if not due:
                return None
            self.fired.append((due[0].kind, point, count))
        return due[0], count


def fire(deferred: str | None) -> None:
    """Fire a fault returned by ``FaultInjector.deferred`` (in this process); None does nothing."""
    if deferred is None:
        return
    kind, _, rest = deferred.partition("@")
    point, _, hit = rest.partition(" (hit ")
    _fire(Fault(kind, point, 1, False), int(hit.rstrip(")")))


def _fire(fault: Fault, hit: int) -> None:
    where = f"injected at {fault.point} (hit {hit})"
    if fault.kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory: {where}")
    if fault.kind in OOM_FORMS:
        raise oom_error(fault.kind, where)
    if fault.kind in TORN_WRITES:
        code, text = TORN_WRITES[fault.kind]
        _torn.error = OSError(code, f"{text}: {where}")
        return
    if fault.kind == "crash":
        os.abort()
    os.kill(os.getpid(), signal.SIGKILL)


def oom_error(kind: str, where: str) -> BaseException:
    """The exception a real allocation failure of that form raises, naming ``where``."""
    class_name, message = OOM_FORMS[kind]
    if class_name == "MemoryError":
        return MemoryError(where)
    if class_name == "AcceleratorError":
        import torch

        return torch.AcceleratorError(f"{message} ({where})")
    return RuntimeError(f"{message} ({where})")
