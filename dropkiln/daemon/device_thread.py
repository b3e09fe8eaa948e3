"""The one long-lived thread that runs every torch call of a daemon's device.

torch's CPU thread pools and CUDA's current device and streams belong to the calling
thread. Each new calling thread gets its own OpenMP pool, and the pools' spinning
threads fight over the cores: the same tiny-model generation took 0.74-0.94 s from one
thread and 2.4-2.7 s once a second thread had also run torch work. So stages, memory
release and device queries all run here, one at a time, and the event loop awaits them.

On the CPU the thread's torch pool leaves one core free (``cpu_threads``): with one OpenMP
thread per core, whatever else runs (the event loop, the store's threads, other programs)
takes a core from an OpenMP thread, and every parallel op then waits at its barrier.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

T = TypeVar("T")


def cpu_threads(threads: int) -> int:
    """The torch threads a CPU device thread runs with: ``threads`` when set (the
    ``torch_threads`` knob); else one fewer than the physical cores (at least one), unless
    ``OMP_NUM_THREADS`` says otherwise (0: leave torch's default alone).

    Measured on a 2-core box with other work running: a tiny-model training step took
    0.03-0.04 s with 1 thread, and 0.04 s to 1.9 s with 2 (twice the CPU time even at
    best: the second thread spins at barriers)."""
    if threads > 0:
        return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return 0
    import psutil

    return max(1, (psutil.cpu_count(logical=False) or 1) - 1)


class DeviceThread:
    """Runs callables on one named thread, set up once for ``device`` and ``threads``."""

    def __init__(self, device: str, threads: int = 0) -> None:
        self.device = device
        self.threads = threads
        self.ident: int | None = None
        self._torch_ready = False
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dropkiln-device", initializer=self._setup
        )

    def _setup(self) -> None:
        self.ident = threading.get_ident()

    def prepare_torch(self) -> None:
        """Import torch and give it this thread's thread count (once, before the first stage;
        not at start-up: a CPU daemon does not import torch until it has work)."""
        if self._torch_ready:
            return
        self._torch_ready = True
        threads = self.threads if self.device.startswith("cuda") else cpu_threads(self.threads)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)

    def _call(self, func: Callable[..., T], *args: Any) -> T:
        if not self._torch_ready and "torch" in sys.modules:
            self.prepare_torch()
        return func(*args)

    def use_device(self, device: str) -> None:
        """Make ``device`` this thread's current CUDA device (a no-op on the CPU)."""
        self.device = device
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(torch.device(device))

    async def run(self, func: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
        """``func(*args)`` on the device thread. As with ``anyio.to_thread.run_sync``, a
        cancelled caller still waits for it unless ``abandon_on_cancel``; then it stops
        waiting and the call runs on to its end unobserved."""
        token = anyio.lowlevel.current_token()
        loop_thread = threading.get_ident()
        finished = anyio.Event()
        future: Future[T] = self._pool.submit(self._call, func, *args)

        def wake(_: Future[T]) -> None:
            if threading.get_ident() == loop_thread:
                finished.set()  # it finished before the callback was added
                return
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                anyio.from_thread.run_sync(finished.set, token=token)

        future.add_done_callback(wake)
        with anyio.CancelScope(shield=not abandon_on_cancel):
            await finished.wait()
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
