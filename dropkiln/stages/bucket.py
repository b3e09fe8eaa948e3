"""The bucket stage: plan every image of a dataset into an aspect-ratio bucket.

Buckets have an area of at most ``resolution``², sides that are multiples of
``bucket_step`` and within ``[min_side, max_side]``; each width gets the tallest height that
fits. An image goes to the bucket nearest its aspect ratio (distance of log ratios,
compared exactly; ties go to the larger bucket, then the narrower). The plan resizes it to
cover the bucket and crops the centre, or a random box drawn from ``seed`` and the image's
path (so a rerun crops the same way).

This stage writes no pixels. It decodes every image once (a truncated file only fails when
its pixels are read) through :func:`dropkiln.stages.imaging.decode_rgb`, the function the
cache stage uses too; see that module for how frames, EXIF, ICC profiles, bit depths and
alpha are handled. Decoding runs in a process pool (forkserver or spawn, never fork: the
daemon has threads). A file that cannot be used is listed with its reason and never stops
the dataset; a dataset without one usable image is a StageError.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dropkiln.config import BucketSettings
from dropkiln.stages.base import (
    StageContext,
    StageDef,
    StageError,
    StageSpec,
    StageStopped,
    write_atomic,
)
from dropkiln.stages.dataset import CaptionError, read_caption, scan_dataset
from dropkiln.stages.imaging import (
    ImageRejected,
    Size,
    bucket_sizes,
    choose_bucket,
    decode_rgb,
    plan_crop,
)

MANIFEST_NAME = "manifest.json"
RESULT_REJECTIONS = 50
STOP_CHECK_EVERY = 16
"""Images between two ``should_stop`` checks; a rerun redoes at most this many (cheaply)."""
IN_FLIGHT_PER_WORKER = 2
"""Images queued per worker: enough to keep cores busy, few enough to stop quickly."""

WORKER_PRELOAD = ["numpy", "PIL.Image", "PIL.ImageCms", "PIL.PngImagePlugin", "pydantic_settings"]


class BucketSpec(StageSpec):
    dataset_dir: str
    name: str
    bucket: BucketSettings = Field(default_factory=BucketSettings)
    seed: int = 1


class ManifestImage(BaseModel):
    """One usable image and its plan. Sizes are (width, height) in upright pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    """Relative to the manifest's dataset_dir, with forward slashes."""
    sha256: str
    caption: str
    original_size: Size
    resized_size: Size
    bucket: Size
    crop_box: tuple[int, int, int, int]
    """(left, top, right, bottom) in resized pixels; right - left, bottom - top = bucket."""
    crop_left: int
    crop_top: int
    source_format: str
    source_mode: str
    notes: list[str] = Field(default_factory=list)

    @property
    def sdxl_time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL size conditioning: original (h, w), crop (top, left), target (h, w)."""
        (width, height), (bucket_w, bucket_h) = self.original_size, self.bucket
        return (height, width, self.crop_top, self.crop_left, bucket_h, bucket_w)


class Rejection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    reason: str


class ManifestSettings(BaseModel):
    """The bucket settings the plan was made with (the worker count does not change it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: int
    bucket_step: int
    min_side: int
    max_side: int
    random_crop: bool
    max_pixels: int
    max_caption_bytes: int
    seed: int


class BucketManifest(BaseModel):
    """The bucket stage's output, read by the cache stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dropkiln.bucket-manifest"] = "dropkiln.bucket-manifest"
    version: Literal[1] = 1
    name: str
    dataset_dir: str
    settings: ManifestSettings
    images: list[ManifestImage]
    rejected: list[Rejection]
    buckets: dict[str, int]
    """"WxH" → number of images, in ascending (width, height) order."""

    @classmethod
    def load(cls, path: Path | str) -> BucketManifest:
        """Read a manifest written by the bucket stage."""
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except (OSError, ValidationError) as exc:
            raise StageError(f"bucket manifest {path} is unreadable: {exc}") from exc

    def image_path(self, image: ManifestImage) -> Path:
        return Path(self.dataset_dir, image.path)


@dataclass(frozen=True)
class ImageTask:
    """One image to plan; picklable, so it can go to a worker process."""

    path: str
    relative: str
    buckets: tuple[Size, ...]
    random_crop: bool
    seed: int
    max_pixels: int
    max_caption_bytes: int


def plan_image(task: ImageTask) -> ManifestImage | Rejection:
    """Decode, caption and plan one image; a file that cannot be used gives a Rejection."""
    path = Path(task.path)
    try:
        data = path.read_bytes()
        decoded = decode_rgb(data, task.max_pixels)
        caption = read_caption(path, task.max_caption_bytes)
    except (ImageRejected, CaptionError) as exc:
        return Rejection(path=task.relative, reason=str(exc))
    except OSError as exc:
        return Rejection(path=task.relative, reason=f"unreadable: {exc.strerror or exc}")
    except Exception as exc:  # a bad file never stops the dataset, whatever the decoder raised
        return Rejection(path=task.relative, reason=f"cannot decode: {type(exc).__name__}: {exc}")
    size = decoded.size
    bucket = choose_bucket(size, task.buckets)
    crop = plan_crop(size, bucket, task.random_crop, f"{task.seed}/{task.relative}")
    notes = list(decoded.notes)
    scale = crop.resized_size[0] / size[0]
    if scale > 1:
        notes.append(f"upscaled ×{scale:.2f} to cover the {bucket[0]}x{bucket[1]} bucket")
    left, top, _, _ = crop.crop_box
    return ManifestImage(
        path=task.relative,
        sha256=hashlib.sha256(data).hexdigest(),
        caption=caption,
        original_size=size,
        resized_size=crop.resized_size,
        bucket=bucket,
        crop_box=crop.crop_box,
        crop_left=left,
        crop_top=top,
        source_format=decoded.source_format,
        source_mode=decoded.source_mode,
        notes=notes,
    )


def run_bucket(spec: BucketSpec, ctx: StageContext) -> dict[str, Any]:
    """Plan a dataset folder into buckets and write the manifest."""
    folder = Path(spec.dataset_dir).absolute()
    buckets = tuple(bucket_sizes(spec.bucket))
    files = scan_dataset(folder)
    rejected = [
        Rejection(path=_relative(path, folder), reason=_unused_file_reason(path))
        for path in files.others
    ]
    tasks = [
        ImageTask(
            path=str(path),
            relative=_relative(path, folder),
            buckets=buckets,
            random_crop=spec.bucket.random_crop,
            seed=spec.seed,
            max_pixels=spec.bucket.max_pixels,
            max_caption_bytes=spec.bucket.max_caption_bytes,
        )
        for path in files.images
    ]
    images: list[ManifestImage] = []

    def record(outcome: ManifestImage | Rejection) -> None:
        if isinstance(outcome, ManifestImage):
            images.append(outcome)
        else:
            rejected.append(outcome)
        done = len(images) + len(rejected) - len(files.others)
        ctx.progress(done, len(tasks), images_ok=len(images), rejected=len(rejected))

    _plan_all(tasks, _worker_count(spec.bucket.workers, len(tasks)), ctx, record)
    images.sort(key=lambda image: image.path)
    rejected.sort(key=lambda rejection: rejection.path)
    if not images:
        raise StageError(_no_usable_image_message(spec.name, folder, rejected))
    manifest = BucketManifest(
        name=spec.name,
        dataset_dir=str(folder),
        settings=ManifestSettings(**spec.bucket.model_dump(exclude={"workers"}), seed=spec.seed),
        images=_note_duplicates(images),
        rejected=rejected,
        buckets=_bucket_counts(images),
    )
    path = write_atomic(ctx.work_dir / MANIFEST_NAME, manifest.model_dump_json(indent=1))
    ctx.artifact(path, "manifest")
    return {
        "manifest": str(path),
        "images": len(images),
        "rejected": len(rejected),
        "buckets": manifest.buckets,
        "rejections": [item.model_dump() for item in rejected[:RESULT_REJECTIONS]],
    }


def _plan_all(
    tasks: list[ImageTask],
    workers: int,
    ctx: StageContext,
    record: Callable[[ManifestImage | Rejection], None],
) -> None:
    stop_check = _StopCheck(ctx)
    if workers <= 1:
        for task in tasks:
            stop_check.tick()
            ctx.fault("bucket.image")
            record(plan_image(task))
        return
    queue = deque(tasks)
    while queue:
        lost = _plan_in_pool(queue, workers, ctx, stop_check, record)
        _plan_one_by_one(lost, record)


def _plan_in_pool(
    queue: deque[ImageTask],
    workers: int,
    ctx: StageContext,
    stop_check: _StopCheck,
    record: Callable[[ManifestImage | Rejection], None],
) -> list[ImageTask]:
    """Plan queued images in a process pool; if a worker dies, return the images it lost."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_process_context())
    in_flight: dict[Future[ManifestImage | Rejection], ImageTask] = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < IN_FLIGHT_PER_WORKER * workers:
                stop_check.tick()
                ctx.fault("bucket.image")
                task = queue.popleft()
                in_flight[pool.submit(plan_image, task)] = task
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    return _salvage(in_flight, record)
                record(future.result())
                del in_flight[future]
        return []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _salvage(
    in_flight: dict[Future[ManifestImage | Rejection], ImageTask],
    record: Callable[[ManifestImage | Rejection], None],
) -> list[ImageTask]:
    """After a worker died: keep what finished, return the rest (the culprit among them)."""
    wait(in_flight)
    lost = []
    for future, task in in_flight.items():
        error = future.exception()
        if error is None:
            record(future.result())
        elif isinstance(error, BrokenProcessPool):
            lost.append(task)
        else:
            raise error
    return lost


def _plan_one_by_one(
    tasks: list[ImageTask], record: Callable[[ManifestImage | Rejection], None]
) -> None:
    """Plan images one at a time in a one-process pool, so a decoder crash names its file."""
    pool: ProcessPoolExecutor | None = None
    try:
        for task in tasks:
            pool = pool or ProcessPoolExecutor(max_workers=1, mp_context=_process_context())
            try:
                record(pool.submit(plan_image, task).result())
            except BrokenProcessPool:
                record(Rejection(path=task.relative, reason="the decoder crashed on this file"))
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


class _StopCheck:
    """Calls ``should_stop`` before the first image and then every STOP_CHECK_EVERY images."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.count = 0

    def tick(self) -> None:
        if self.count % STOP_CHECK_EVERY == 0 and self.ctx.should_stop():
            raise StageStopped(f"bucketing stopped after {self.count} images")
        self.count += 1


def _process_context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Workers fork with the heavy libraries already imported. Not dropkiln itself: the
        # fork server does not get our sys.path, so it could find another copy of dropkiln.
        # (Takes effect only if the fork server is not running yet.)
        context.set_forkserver_preload(WORKER_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def _worker_count(configured: int, images: int) -> int:
    if configured == 0:
        configured = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        configured = configured or os.cpu_count() or 1
    return max(1, min(configured, images))


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _unused_file_reason(path: Path) -> str:
    suffix = path.suffix.lower()
    if not suffix:
        return "not used: no file extension (images are .png, .jpg, .webp, …)"
    return f"not used: {suffix} is not an image type dropkiln reads"


def _note_duplicates(images: list[ManifestImage]) -> list[ManifestImage]:
    first_with: dict[str, str] = {}
    noted = []
    for image in images:
        original = first_with.setdefault(image.sha256, image.path)
        if original != image.path:
            image = image.model_copy(update={"notes": [*image.notes, f"same bytes as {original}"]})
        noted.append(image)
    return noted


def _bucket_counts(images: list[ManifestImage]) -> dict[str, int]:
    counts = Counter(image.bucket for image in images)
    return {f"{width}x{height}": counts[width, height] for width, height in sorted(counts)}


def _no_usable_image_message(name: str, folder: Path, rejected: list[Rejection]) -> str:
    if not rejected:
        return f"no usable image in dataset {name}: no files found in {folder}"
    first = "; ".join(f"{item.path}: {item.reason}" for item in rejected[:3])
    more = ", …" if len(rejected) > 3 else ""
    return f"no usable image in dataset {name}: {len(rejected)} files rejected ({first}{more})"


STAGE = StageDef("bucket", lane="cpu", spec=BucketSpec, run=run_bucket, priority=5)
