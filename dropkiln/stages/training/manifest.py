"""Reading the bucket stage's manifest and cutting each image to its planned bucket."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropkiln.stages.base import StageError

Size = tuple[int, int]


@dataclass(frozen=True)
class PlannedImage:
    """One image as the bucket stage planned it. Sizes are (width, height)."""

    path: str
    sha256: str
    caption: str
    original_size: Size
    resized_size: Size
    bucket: Size
    crop_box: tuple[int, int, int, int]
    """(left, top, right, bottom) in resized pixels."""

    @property
    def crop_top_left(self) -> tuple[int, int]:
        return self.crop_box[1], self.crop_box[0]

    @property
    def flipped_crop_top_left(self) -> tuple[int, int]:
        """Crop (top, left) of the mirrored image: the crop box seen from the other side."""
        return self.crop_box[1], self.resized_size[0] - self.crop_box[2]


@dataclass(frozen=True)
class Manifest:
    name: str
    dataset_dir: Path
    images: list[PlannedImage]
    max_file_bytes: int = 2**40

    def image_path(self, image: PlannedImage) -> Path:
        return self.dataset_dir / image.path


def read_manifest(path: Path | str) -> Manifest:
    """The bucket manifest at ``path`` (the one place that knows its field names)."""
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
        images = [_planned_image(item) for item in data["images"]]
        limit = int(data.get("settings", {}).get("max_file_bytes", 2**40))
        return Manifest(str(data["name"]), Path(data["dataset_dir"]), images, limit)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"bucket manifest {path} is unreadable: {exc}") from exc


def _planned_image(item: dict[str, Any]) -> PlannedImage:
    left, top, right, bottom = (int(v) for v in item["crop_box"])
    bucket = _size(item["bucket"])
    if (right - left, bottom - top) != bucket:
        raise ValueError(f"{item['path']}: crop box {item['crop_box']} is not the bucket {bucket}")
    return PlannedImage(
        path=str(item["path"]),
        sha256=str(item["sha256"]),
        caption=str(item.get("caption", "")),
        original_size=_size(item["original_size"]),
        resized_size=_size(item["resized_size"]),
        bucket=bucket,
        crop_box=(left, top, right, bottom),
    )


def _size(value: Any) -> Size:
    width, height = (int(v) for v in value)
    return width, height


def load_bucket_pixels(manifest: Manifest, image: PlannedImage) -> Any:
    """The image resized and cropped to its bucket, upright RGB; checks it did not change."""
    from dropkiln.stages.dataset import UnsafeFile, read_dataset_file
    from dropkiln.stages.imaging import ImageRejected, crop_to_bucket, decode_rgb

    try:
        # Not following links: the dropper may still write to the dataset folder.
        data = read_dataset_file(manifest.dataset_dir, image.path, manifest.max_file_bytes)
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
