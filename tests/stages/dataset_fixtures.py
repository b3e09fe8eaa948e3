"""Small datasets with a bucket manifest, standing in for the bucket stage in these tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dropkiln.options import BucketSettings
from dropkiln.stages.bucket_manifest import BucketManifest, ManifestImage, ManifestSettings


@dataclass(frozen=True)
class FixtureImage:
    stem: str
    colour: tuple[int, int, int]
    caption: str
    size: tuple[int, int] = (80, 64)
    bucket: tuple[int, int] = (64, 64)
    stripes: bool = True


def write_dataset(folder: Path, images: list[FixtureImage]) -> None:
    """Write PNGs (a coloured field with a stripe pattern) and same-stem captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in images:
        picture = Image.new("RGB", item.size, item.colour)
        if item.stripes:
            for x in range(0, item.size[0], 8):
                for y in range(item.size[1]):
                    picture.putpixel((x, y), (255 - item.colour[0], 40, 200))
        picture.save(folder / f"{item.stem}.png")
        (folder / f"{item.stem}.txt").write_text(item.caption)


def write_manifest(folder: Path, images: list[FixtureImage], target: Path, name: str) -> Path:
    """A manifest in the bucket stage's format: cover the bucket, centre crop."""
    entries = []
    for item in images:
        data = (folder / f"{item.stem}.png").read_bytes()
        scale = max(item.bucket[0] / item.size[0], item.bucket[1] / item.size[1])
        resized = (round(item.size[0] * scale), round(item.size[1] * scale))
        left = (resized[0] - item.bucket[0]) // 2
        top = (resized[1] - item.bucket[1]) // 2
        entries.append(
            ManifestImage(
                path=f"{item.stem}.png",
                sha256=hashlib.sha256(data).hexdigest(),
                caption=item.caption,
                original_size=item.size,
                resized_size=resized,
                bucket=item.bucket,
                crop_box=(left, top, left + item.bucket[0], top + item.bucket[1]),
                crop_left=left,
                crop_top=top,
                source_format="PNG",
                source_mode="RGB",
            )
        )
    buckets: dict[str, int] = {}
    for item in images:
        key = f"{item.bucket[0]}x{item.bucket[1]}"
        buckets[key] = buckets.get(key, 0) + 1
    manifest = BucketManifest(
        name=name,
        dataset_dir=str(folder),
        settings=ManifestSettings.of(BucketSettings(resolution=64, min_side=64), seed=1),
        images=entries,
        rejected=[],
        buckets=buckets,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(manifest.model_dump_json(indent=1))
    return target


def make_dataset(root: Path, name: str, images: list[FixtureImage]) -> Path:
    """Dataset folder + manifest under ``root``; returns the manifest path."""
    folder = root / "drop" / "datasets" / name
    write_dataset(folder, images)
    return write_manifest(folder, images, root / "state" / "work" / name / "manifest.json", name)


def mixed_images(count: int = 4) -> list[FixtureImage]:
    """A few images in two buckets with tag captions."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (120, 60, 160)]
    images = []
    for index in range(count):
        wide = index % 2 == 1
        images.append(
            FixtureImage(
                stem=f"img{index:02d}",
                colour=colours[index % len(colours)],
                caption=f"sks cat, red hair, photo {index}",
                size=(96, 64) if wide else (64, 80),
                bucket=(64, 64) if not wide else (96, 64),
            )
        )
    return images
