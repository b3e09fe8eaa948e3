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
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dropkiln.options import BucketSettings
from dropkiln.stages.base import (
    StageContext,
    StageDef,
    StageError,
    StageResult,
    StageSpec,
    validation_reason,
    write_atomic,
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
    crop_to_bucket,
    decode_rgb,
    plan_crop,
)

if TYPE_CHECKING:
    from PIL import Image

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT: Final = "dropkiln.bucket-manifest"
MANIFEST_VERSION: Final = 1
RESULT_REJECTIONS = 50
CRASHED = "the decoder crashed on this file"
UNCAPPED_FILE_BYTES = 2**40
"""The file size bound of a manifest written before ``max_file_bytes`` existed (its images
were read whatever their size), and of a cache index, which does not record it: the bytes
are checked against their sha256 anyway."""


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

    @model_validator(mode="after")
    def _crop_is_the_bucket(self) -> ManifestImage:
        left, top, right, bottom = self.crop_box
        if (right - left, bottom - top) != self.bucket:
            raise ValueError(
                f"{self.path}: crop box {self.crop_box} is not the bucket {self.bucket}"
            )
        return self

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop: SDXL's crop conditioning."""
        return self.crop_box[1], self.crop_box[0]

    @property
    def flipped_crop_top_left(self) -> tuple[int, int]:
        """Crop (top, left) of the mirrored image: the crop box seen from the other side."""
        return self.crop_box[1], self.resized_size[0] - self.crop_box[2]


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
    max_file_bytes: int = UNCAPPED_FILE_BYTES
    seed: int

    @classmethod
    def of(cls, bucket: BucketSettings, seed: int) -> ManifestSettings:
        return cls(**bucket.model_dump(exclude={"workers"}), seed=seed)


class BucketManifest(BaseModel):
    """The bucket stage's output, read by the cache stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dropkiln.bucket-manifest"] = MANIFEST_FORMAT
    version: Literal[1] = MANIFEST_VERSION
    name: str
    dataset_dir: str
    settings: ManifestSettings
    images: list[ManifestImage]
    rejected: list[Rejection]
    buckets: dict[str, int]
    """"WxH" → number of images, in ascending (width, height) order."""

    @classmethod
    def load(cls, path: Path | str) -> BucketManifest:
        """Read a manifest written by the bucket stage; StageError says why one cannot be."""
        try:
            data = json.loads(Path(path).read_bytes())
        except OSError as exc:
            raise StageError(f"bucket manifest {path} is unreadable: {exc}") from exc
        except ValueError as exc:
            raise StageError(f"bucket manifest {path} is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise StageError(f"{path} is not a bucket manifest")
        version = data.get("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise StageError(
                f"bucket manifest {path} is format version {version}, which this dropkiln "
                f"does not read (it reads {MANIFEST_VERSION}); drop the dataset again"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise StageError(
                f"bucket manifest {path} is damaged: {validation_reason(exc)}"
            ) from exc

    def image_path(self, image: ManifestImage) -> Path:
        return Path(self.dataset_dir, image.path)

    def bucket_pixels(self, image: ManifestImage) -> Image.Image:
        """``image`` resized and cropped to its bucket (``bucket_pixels``)."""
        return bucket_pixels(Path(self.dataset_dir), image, self.settings.max_file_bytes)


class PlannedImage(Protocol):
    """An image and its bucket plan: a manifest entry, or a cache index entry repeating it."""

    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def original_size(self) -> Size: ...
    @property
    def resized_size(self) -> Size: ...
    @property
    def crop_box(self) -> tuple[int, int, int, int]: ...


def bucket_pixels(dataset_dir: Path, image: PlannedImage, max_file_bytes: int) -> Image.Image:
    """The image resized and cropped to its bucket, upright RGB; checks it did not change."""
    try:
        # Not following links: the dropper may still write to the dataset folder.
        data = read_dataset_file(dataset_dir, image.path, max_file_bytes)
    except (UnsafeFile, OSError) as exc:
        raise StageError(f"dataset image {image.path} cannot be read: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise StageError(
            f"dataset image {image.path} changed after it was bucketed; drop the dataset again"
        )
    # Decoded exactly as the bucket stage decoded it (orientation, colour profile, bit
    # depth, alpha), so the cached pixels are the pixels that were bucketed. The bytes are
    # the ones the bucket stage accepted, so their own size is the pixel bound.
    width, height = image.original_size
    try:
        decoded = decode_rgb(data, max_pixels=width * height)
    except ImageRejected as exc:
        raise StageError(f"dataset image {image.path} cannot be decoded: {exc}") from exc
    return crop_to_bucket(decoded.image, image.resized_size, image.crop_box)


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
