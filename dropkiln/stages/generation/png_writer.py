"""Writing a batch's PNGs on a background thread while the next batch denoises.

PNG compression and the fsync of an atomic write release the GIL, so they overlap with
the pipeline's next call instead of adding to it. What the run records about a written
image (its fault point, its artifact, the checkpoint after the batch) stays on the
calling thread, in order, once the image is on disk: ``settle`` does that.

A thread that waits for the writes has nothing else to do, so it first writes the ones the
writer thread has not started yet itself (``help``): after the last batch, when no denoise
runs beside them, its images are encoded and fsynced two at a time instead of one after
another. The writer stays one thread, so during a denoise it takes one core at most.

A write hashes the bytes it writes, so the image is recorded with its sha256 without
reading the file back.

Each write first makes the image's contact-sheet thumbnail, so the sheet is built from
memory (no PNG decoded again); it is encoded on the writer thread while the settling thread
records the last batch's images.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from dropkiln.stages.base import write_atomic
from dropkiln.stages.faults import arm_torn_write, take_torn_write
from dropkiln.stages.generation.png_files import png_bytes, sheet_thumbnail

if TYPE_CHECKING:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

Written = Callable[[Path, str], None]
"""Told a written file and the sha256 of its bytes."""
T = TypeVar("T")


@dataclass(eq=False)
class _Write:
    image: Image.Image
    target: Path
    info: PngInfo
    written: Written
    torn: OSError | None
    future: Future[None] = field(default_factory=Future)
    outcome: BaseException | None = None
    thumbnail: Image.Image | None = None
    thumbnailed: threading.Event = field(default_factory=threading.Event)
    helped: bool = False
    """Written on the thread that settles (``future`` is then cancelled)."""
    sha256: str = ""

    def run(self) -> None:
        try:
            self.thumbnail = sheet_thumbnail(self.image)
        finally:
            self.thumbnailed.set()
        data = png_bytes(self.image, self.info)
        self.sha256 = hashlib.sha256(data).hexdigest()
        arm_torn_write(self.torn)
        write_atomic(self.target, data)

    def error(self) -> BaseException | None:
        """The write's error (waiting for it to end)."""
        if self.helped:
            return self.outcome
        return self.future.exception()


class PngWriter:
    """One writer thread; the writes of one batch at a time are pending."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropkiln-png")
        self._pending: list[_Write] = []
        self._then: Callable[[], None] | None = None
        self.thumbnails: dict[Path, Image.Image] = {}
        """The contact-sheet thumbnails of the images written (and recorded) so far."""

    def submit(self, image: Image.Image, target: Path, info: PngInfo, written: Written) -> None:
        """Write ``image`` atomically in the background; ``written(target, sha256)`` runs at
        ``settle``."""
        # a torn-write fault armed on this thread is meant for this write: hand it over
        write = _Write(image, target, info, written, take_torn_write())
        write.future = self._pool.submit(write.run)
        self._pending.append(write)

    def after_writes(self, work: Callable[[], T]) -> Future[T]:
        """Run ``work`` (the contact sheet) on the writer thread once its writes are done, while
        this thread records them."""
        return self._pool.submit(work)

    def then(self, after: Callable[[], None]) -> None:
        """Run ``after`` (the batch's checkpoint) once every pending write has been recorded."""
        self._then = after

    def help(self) -> None:
        """Write, on this thread and in order, each pending write the writer has not started."""
        for write in self._pending:
            if write.helped or not write.future.cancel():
                continue  # running or done on the writer thread
            write.helped = True
            try:
                write.run()
            except Exception as exc:  # raised in order at its turn, as the writer's would be
                write.outcome = exc

    def thumbnail(self, target: Path) -> Image.Image | None:
        """The contact-sheet thumbnail of an image submitted to this writer (None for others),
        once made; the write itself may still be running."""
        if target in self.thumbnails:
            return self.thumbnails[target]
        for write in self._pending:
            if write.target == target:
                self.help()
                write.thumbnailed.wait()
                return write.thumbnail
        return None

    def failed(self) -> bool:
        """A pending write has failed (by now; a running one may still fail)."""
        return any((w.helped or w.future.done()) and w.error() is not None for w in self._pending)

    def settle(self) -> None:
        """Wait for the pending writes, then record them in order; a failed write raises its
        error after the ones before it are recorded (the ones after it are on disk, and a
        rerun finds them by content)."""
        self.help()
        pending, self._pending = self._pending, []
        then, self._then = self._then, None
        wait([write.future for write in pending if not write.helped])
        for write in pending:
            error = write.error()
            if error is not None:
                raise error
            self._record(write)
        if then is not None:
            then()

    def settle_quietly(self) -> None:
        """``settle`` while another error is on its way out: record what was written, up to the
        first failed write, and raise nothing of the writes' own."""
        pending, self._pending = self._pending, []
        then, self._then = self._then, None
        # an error is leaving: no help (no new write), only what was started
        wait([write.future for write in pending if not write.helped])
        for write in pending:
            if write.error() is not None:
                return
            self._record(write)
        if then is not None:
            then()

    def close(self) -> None:
        """No thread left writing (pending writes finish, unrecorded)."""
        self._pool.shutdown(wait=True)
        self._pending, self._then = [], None

    def _record(self, write: _Write) -> None:
        if write.thumbnail is not None:
            self.thumbnails[write.target] = write.thumbnail
        write.written(write.target, write.sha256)
