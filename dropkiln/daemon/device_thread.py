"""The one long-lived thread that runs every torch call of a daemon's device.

torch's CPU thread pools and CUDA's current device and streams belong to the calling
thread. Each new calling thread gets its own OpenMP pool, and the pools' spinning
threads fight over the cores: the same tiny-model generation took 0.74-0.94 s from one
thread and 2.4-2.7 s once a second thread had also run torch work. So stages, memory
release and device queries all run here, one at a time, and the event loop awaits them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

T = TypeVar("T")


class DeviceThread:
    """Runs callables on one named thread, set up once for ``device`` and ``threads``."""

    def __init__(self, device: str, threads: int = 0) -> None:
        self.device = device
        self.threads = threads
        self.ident: int | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dropkiln-device", initializer=self._setup
        )

    def _setup(self) -> None:
        self.ident = threading.get_ident()
        if self.threads > 0:
            import torch

            torch.set_num_threads(self.threads)

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
        future: Future[T] = self._pool.submit(func, *args)

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
