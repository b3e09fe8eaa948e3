"""A batch's checkpoint committed on a thread of its own while the next batch denoises.

In the daemon a checkpoint is a round trip to the event loop and a commit the calling thread
waits for: 8-36 ms a batch, which the device thread spent idle between two images. Here one
record is under way at a time; every other report of the run waits for it first (``wait``),
so the store sees them in the order the run made them. A kill before the commit loses that
checkpoint only: the images it covers are on disk with their digests, and the next attempt
finds and records them again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BatchRecords:
    """One record at a time, off the calling thread; its error is raised by ``wait``."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropkiln-records")
        self._under_way: Future[None] | None = None

    def submit(self, record: Callable[..., None], *args: Any) -> None:
        """Run ``record(*args)`` once the record before it has ended."""
        self.wait()
        self._under_way = self._pool.submit(record, *args)

    def wait(self) -> None:
        """Wait for the record under way; raise its error."""
        under_way, self._under_way = self._under_way, None
        if under_way is not None:
            under_way.result()

    def close(self) -> None:
        """Wait for the record under way (its error is dropped: another is on its way out,
        or ``wait`` already raised it) and end the thread."""
        try:
            self.wait()
        except Exception:
            pass
        finally:
            self._pool.shutdown(wait=True)
