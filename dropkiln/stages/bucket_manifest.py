"""The bucket stage's manifest: what it planned for each image of a dataset, read by the
cache stage (and applied by ``bucket_pixels``), and the files it rejected with reasons.

The bucket stage owns this format; its consumers validate with ``BucketManifest.load``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dropkiln.options import BucketSettings
from dropkiln.stages.base import StageError, validation_reason
from dropkiln.stages.dataset import UnsafeFile, read_dataset_file
from dropkiln.stages.imaging import ImageRejected, Size, crop_to_bucket, decode_rgb

if TYPE_CHECKING:
    from PIL import Image

MANIFEST_FORMAT: Final = "dropkiln.bucket-manifest"
MANIFEST_VERSION: Final = 1
UNCAPPED_FILE_BYTES = 2**40
"""The file size bound of a manifest written before ``max_file_bytes`` existed (its images
were read whatever their size), and of a cache index, which does not record it: the bytes
are checked against their sha256 anyway."""


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
