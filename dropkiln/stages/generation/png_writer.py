"""Writing a batch's PNGs on a background thread while the next batch denoises.

PNG compression and the fsync of an atomic write release the GIL, so they overlap with
the pipeline's next call instead of adding to it. What the run records about a written
image (its fault point, its artifact, the checkpoint after the batch) stays on the
calling thread, in order, once the image is on disk: ``settle`` does that.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from dropkiln.stages.faults import arm_torn_write, take_torn_write
from dropkiln.stages.generation.png_files import write_png

if TYPE_CHECKING:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

Written = Callable[[Path], None]


class PngWriter:
    """One writer thread; the writes of one batch at a time are pending."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropkiln-png")
        self._pending: list[tuple[Future[Path], Written]] = []
        self._then: Callable[[], None] | None = None

    def submit(self, image: Image.Image, target: Path, info: PngInfo, written: Written) -> None:
        """Write ``image`` atomically in the background; ``written(target)`` runs at ``settle``."""
        # a torn-write fault armed on this thread is meant for this write: hand it over
        torn = take_torn_write()
        self._pending.append((self._pool.submit(_write, image, target, info, torn), written))

    def then(self, after: Callable[[], None]) -> None:
        """Run ``after`` (the batch's checkpoint) once every pending write has been recorded."""
        self._then = after

    def settle(self) -> None:
        """Wait for the pending writes, then record them in order; a failed write raises its
        error after the ones before it are recorded (the ones after it are on disk, and a
        rerun finds them by content)."""
        pending, self._pending = self._pending, []
        then, self._then = self._then, None
        wait([future for future, _ in pending])
        for future, written in pending:
            written(future.result())
        if then is not None:
            then()

    def settle_quietly(self) -> None:
        """``settle`` while another error is on its way out: record what was written, up to the
        first failed write, and raise nothing of the writes' own."""
        pending, self._pending = self._pending, []
        then, self._then = self._then, None
        wait([future for future, _ in pending])
        for future, written in pending:
            if future.exception() is not None:
                return
            written(future.result())
        if then is not None:
            then()

    def close(self) -> None:
        """No thread left writing (pending writes finish, unrecorded)."""
        self._pool.shutdown(wait=True)
        self._pending, self._then = [], None


def _write(image: Image.Image, target: Path, info: PngInfo, torn: OSError | None) -> Path:
    arm_torn_write(torn)
    return write_png(image, target, info)
