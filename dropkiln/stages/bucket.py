"""The bucket stage: plan every image of a dataset into an aspect-ratio bucket.

Buckets have an area of at most ``resolution``², sides that are multiples of
``bucket_step`` and within ``[min_side, max_side]``; each width gets the tallest height that
fits. An image goes to the bucket nearest its aspect ratio (distance of log ratios,
compared exactly; ties go to the larger bucket, then the narrower). The plan resizes it to
cover the bucket and crops the centre, or a random box drawn from ``seed`` and the image's
path (so a rerun crops the same way).

It writes no pixels but decodes every image once (truncation shows only then) with
``imaging.decode_rgb``, as the cache stage does, always in worker processes
(``decode_pool``): a decoder that crashes costs that file, not the daemon. Files are read
without following links and refused above ``max_file_bytes`` before they are read. A bad
file is listed with its reason and never stops the dataset; a dataset without one usable
image is a StageError."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from dropkiln.options import BucketSettings
from dropkiln.stages.base import (
    StageContext,
    StageDef,
    StageError,
    StageResult,
    StageSpec,
    write_atomic,
)
from dropkiln.stages.bucket_manifest import (
    BucketManifest,
    ManifestImage,
    ManifestSettings,
    Rejection,
)
from dropkiln.stages.dataset import (
    CaptionError,
    UnsafeFile,
    read_caption,
    read_dataset_file,
    scan_dataset,
)
from dropkiln.stages.decode_pool import run_in_pool, worker_count
from dropkiln.stages.faults import fire
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
CRASHED = "the decoder crashed on this file"


class BucketSpec(StageSpec):
    dataset_dir: str
    name: str
    bucket: BucketSettings = Field(default_factory=BucketSettings)
    seed: int = 1


class BucketResult(StageResult):
    """What the bucket stage hands on: where its manifest is, and a summary of it."""

    manifest: str
    """The manifest's path (BucketManifest)."""
    images: int
    rejected: int
    buckets: dict[str, int]
    rejections: list[Rejection]
    """The first ``RESULT_REJECTIONS`` rejected files, with their reasons."""

    @classmethod
    def of(cls, path: Path, manifest: BucketManifest | None = None) -> BucketResult:
        """The result that hands on the manifest at ``path`` (read from there if not given)."""
        manifest = manifest if manifest is not None else BucketManifest.load(path)
        return cls(
            manifest=str(path),
            images=len(manifest.images),
            rejected=len(manifest.rejected),
            buckets=manifest.buckets,
            rejections=manifest.rejected[:RESULT_REJECTIONS],
        )


@dataclass(frozen=True)
class ImageTask:
    """One image to plan; picklable, so it can go to a worker process."""

    dataset_dir: str
    relative: str
    buckets: tuple[Size, ...]
    random_crop: bool
    seed: int
    max_pixels: int
    max_caption_bytes: int
    max_file_bytes: int
    fault: str | None = None
    """A fault to fire in the worker while it decodes (``bucket.decode``; tests only)."""


def plan_image(task: ImageTask) -> ManifestImage | Rejection:
    """Decode, caption and plan one image; a file that cannot be used gives a Rejection.

    Runs in a decode worker process: the file's bytes are untrusted."""
    folder = Path(task.dataset_dir)
    try:
        data = read_dataset_file(folder, task.relative, task.max_file_bytes)
        fire(task.fault)
        decoded = decode_rgb(data, task.max_pixels)
        caption = read_caption(folder / task.relative, task.max_caption_bytes, folder)
    except UnsafeFile as exc:
        return Rejection(path=task.relative, reason=str(exc))
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


def run_bucket(spec: BucketSpec, ctx: StageContext) -> BucketResult:
    """Plan a dataset folder into buckets and write the manifest."""
    folder = Path(spec.dataset_dir).absolute()
    buckets = tuple(bucket_sizes(spec.bucket))
    files = scan_dataset(folder)
    rejected = [
        Rejection(path=_relative(path, folder), reason=_unused_file_reason(path))
        for path in files.others
    ] + [
        Rejection(
            path=_relative(path, folder), reason="a symbolic link; dropkiln does not follow links"
        )
        for path in files.links
    ]
    skipped = len(rejected)
    tasks = [
        ImageTask(
            dataset_dir=str(folder),
            relative=_relative(path, folder),
            buckets=buckets,
            random_crop=spec.bucket.random_crop,
            seed=spec.seed,
            max_pixels=spec.bucket.max_pixels,
            max_caption_bytes=spec.bucket.max_caption_bytes,
            max_file_bytes=spec.bucket.max_file_bytes,
        )
        for path in files.images
    ]
    images: list[ManifestImage] = []

    def record(outcome: ManifestImage | Rejection) -> None:
        if isinstance(outcome, ManifestImage):
            images.append(outcome)
        else:
            rejected.append(outcome)
        done = len(images) + len(rejected) - skipped
        ctx.progress(done, len(tasks), images_ok=len(images), rejected=len(rejected))

    def dispatch(task: ImageTask) -> ImageTask:
        ctx.fault("bucket.image")
        return dataclasses.replace(task, fault=ctx.deferred_fault("bucket.decode"))

    def crashed(task: ImageTask) -> Rejection:
        return Rejection(path=task.relative, reason=CRASHED)

    workers = worker_count(spec.bucket.workers, len(tasks))
    run_in_pool(tasks, plan_image, workers, ctx, record, crashed, dispatch)
    images.sort(key=lambda image: image.path)
    rejected.sort(key=lambda rejection: rejection.path)
    if not images:
        raise StageError(_no_usable_image_message(spec.name, folder, rejected))
    manifest = BucketManifest(
        name=spec.name,
        dataset_dir=str(folder),
        settings=ManifestSettings.of(spec.bucket, spec.seed),
        images=_note_duplicates(images),
        rejected=rejected,
        buckets=_bucket_counts(images),
    )
    path = write_atomic(ctx.work_dir / MANIFEST_NAME, manifest.model_dump_json(indent=1))
    ctx.artifact(path, "manifest")
    return BucketResult.of(path, manifest)


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
