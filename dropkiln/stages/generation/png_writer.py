"""Writing a batch's PNGs on a background thread while the next batch denoises.

PNG compression and the fsync of an atomic write release the GIL, so they overlap with
the pipeline's next call instead of adding to it. What the run records about a written
image (its fault point, its artifact, the checkpoint after the batch) stays on the
calling thread, in order, once the image is on disk: ``settle`` does that.

A thread that settles has nothing else to do until the writes are done, so it writes the
ones the writer thread has not started yet itself: after the last batch, when no denoise
runs beside them, its images are encoded and fsynced two at a time instead of one after
another. The writer stays one thread, so during a denoise only one core is taken from it.

Each write also makes the image's contact-sheet thumbnail, so the sheet is built from
memory instead of decoding every PNG again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from dropkiln.stages.faults import arm_torn_write, take_torn_write
from dropkiln.stages.generation.png_files import sheet_thumbnail, write_png

if TYPE_CHECKING:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

Written = Callable[[Path, "Image.Image"], None]
"""Told the written file and its contact-sheet thumbnail."""
_Job = Callable[[], tuple[Path, "Image.Image"]]


class PngWriter:
    """One writer thread; the writes of one batch at a time are pending."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropkiln-png")
        self._pending: list[tuple[Future[tuple[Path, Image.Image]], _Job, Written]] = []
        self._then: Callable[[], None] | None = None

    def submit(self, image: Image.Image, target: Path, info: PngInfo, written: Written) -> None:
        """Write ``image`` atomically in the background; ``written(target, thumbnail)`` runs
        at ``settle``."""
        # a torn-write fault armed on this thread is meant for this write: hand it over
        job = partial(_write, image, target, info, take_torn_write())
        self._pending.append((self._pool.submit(job), job, written))

    def then(self, after: Callable[[], None]) -> None:
        """Run ``after`` (the batch's checkpoint) once every pending write has been recorded."""
        self._then = after

    def settle(self) -> None:
        """Wait for the pending writes, then record them in order; a failed write raises its
        error after the ones before it are recorded (the ones after it are on disk, and a
        rerun finds them by content)."""
        pending, self._pending = self._pending, []
        then, self._then = self._then, None
        results = _help(pending)
        for (future, _, written), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            written(*(result if result is not None else future.result()))
        if then is not None:
            then()

    def settle_quietly(self) -> None:
        """``settle`` while another error is on its way out: record what was written, up to the
        first failed write, and raise nothing of the writes' own."""
        pending, self._pending = self._pending, []
        then, self._then = self._then, None
        wait([future for future, _, _ in pending])  # an error is leaving: no help, no new write
        for future, _, written in pending:
            if future.cancelled() or future.exception() is not None:
                return
            written(*future.result())
        if then is not None:
            then()

    def close(self) -> None:
        """No thread left writing (pending writes finish, unrecorded)."""
        self._pool.shutdown(wait=True)
        self._pending, self._then = [], None


def _help(
    pending: list[tuple[Future[tuple[Path, Image.Image]], _Job, Written]],
) -> list[tuple[Path, Image.Image] | BaseException | None]:
    """Write, on this thread, each pending write the writer has not started (in order), then
    wait for the writer's. Per write: its result or error when written here, else None."""
    results: list[tuple[Path, Image.Image] | BaseException | None] = []
    for future, job, _ in pending:
        if not future.cancel():
            results.append(None)  # running or done on the writer thread
            continue
        try:
            results.append(job())
        except Exception as exc:  # raised in order at its turn, as the writer's would be
            results.append(exc)
    wait([future for future, _, _ in pending if not future.cancelled()])
    return results


def _write(
    image: Image.Image, target: Path, info: PngInfo, torn: OSError | None
) -> tuple[Path, Image.Image]:
    arm_torn_write(torn)
    path = write_png(image, target, info)
    return path, sheet_thumbnail(image)
