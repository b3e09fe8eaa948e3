"""Dataset files are untrusted after ingest too.

Defect 16: a decoder that crashes costs only its file (decoding always runs in worker
processes, even for a handful of images), and a huge file is refused before it is read.
Defect 10: the dropper may still write to ``processed/ID-NAME``; a link put there later is
never followed, by the bucket stage or the cache stage."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from dataset_fixtures import make_dataset, mixed_images
from PIL import Image

from dropkiln.config import BucketSettings
from dropkiln.stages.base import StageError
from dropkiln.stages.bucket import BucketResult, BucketSpec, run_bucket
from dropkiln.stages.cache import STAGE as CACHE
from dropkiln.stages.cache import CacheSpec
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.testing import LocalContext


def png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def small_dataset(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"img{index}.png").write_bytes(png((40 * index, 90, 200)))
        (folder / f"img{index}.txt").write_text(f"photo {index}")
    return folder


def bucket(folder: Path, tmp_path: Path, faults: str = "", **settings: Any) -> dict[str, Any]:
    ctx = LocalContext(root=tmp_path, work_dir=tmp_path / "work", faults=FaultInjector(faults))
    spec = BucketSpec(
        dataset_dir=str(folder),
        name="cats",
        bucket=BucketSettings(**{"resolution": 256, "min_side": 64, **settings}),
    )
    return run_bucket(spec, ctx)


def reasons(result: dict[str, Any]) -> dict[str, str]:
    return {item.path: item.reason for item in result.rejections}


def test_defect16_a_decoder_crash_in_a_small_dataset_costs_only_that_file(
    tmp_path: Path,
) -> None:
    """Three images, workers on automatic: the second decode aborts its process (a real
    SIGABRT). This test process is the daemon here; it lives, and only img1 is lost."""
    folder = small_dataset(tmp_path / "cats")
    pid = os.getpid()
    result = bucket(folder, tmp_path, faults="crash@bucket.decode:2")
    assert os.getpid() == pid
    assert result.images == 2
    assert reasons(result) == {"img1.png": "the decoder crashed on this file"}


def test_defect16_a_file_over_max_file_bytes_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    folder = small_dataset(tmp_path / "cats")
    big = folder / "huge.png"
    big.write_bytes(png((1, 2, 3)) + bytes(300_000))  # a PNG with a long tail
    result = bucket(folder, tmp_path, max_file_bytes=200_000)
    assert result.images == 3
    assert reasons(result) == {
        "huge.png": f"{big.stat().st_size} bytes, over max_file_bytes=200000; not read"
    }


def test_defect10_links_put_into_a_dataset_later_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png((255, 0, 0)))
    (outside / "secret.txt").write_text("private caption")
    (outside / "more").mkdir()
    (outside / "more" / "also.png").write_bytes(png((0, 255, 0)))
    folder = small_dataset(tmp_path / "cats")
    (folder / "stolen.png").symlink_to(outside / "secret.png")
    (folder / "img0.txt").unlink()
    (folder / "img0.txt").symlink_to(outside / "secret.txt")
    (folder / "sub").symlink_to(outside / "more", target_is_directory=True)
    (folder / "again.png").symlink_to(folder / "img2.png")  # inside the dataset: not either
    result = bucket(folder, tmp_path)
    assert result.images == 2  # img1 and img2; img0's caption is a link
    link = "a symbolic link; dropkiln does not follow links"
    got = reasons(result)
    assert got.pop("img0.png").startswith("caption img0.txt: img0.txt is a symbolic link")
    assert got == {"again.png": link, "stolen.png": link, "sub": link, "img0.txt": link}


def test_defect10_the_cache_stage_does_not_follow_a_link_swapped_in_after_bucketing(
    tmp_path: Path, models_dir: Path
) -> None:
    root = tmp_path / "root"
    (root / "state").mkdir(parents=True)
    (root / "state" / "models").symlink_to(models_dir, target_is_directory=True)
    manifest = make_dataset(root, "cats", mixed_images(2))
    image = root / "drop" / "datasets" / "cats" / "img00.png"
    copy = tmp_path / "copy.png"  # the very same bytes: the hash check alone would pass
    copy.write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(copy)
    ctx = LocalContext(
        root=root,
        work_dir=root / "state" / "work" / "cache",
        upstream_results={"bucket": BucketResult.of(manifest)},
    )
    with pytest.raises(StageError, match=r"img00\.png.*symbolic link"):
        CACHE.run(CacheSpec(name="cats"), ctx)


def test_defect10_a_control_image_swapped_for_a_link_is_not_read(tmp_path: Path) -> None:
    from dropkiln.stages.generation.controlnet import control_image
    from dropkiln.stages.generation.prompt_file import ControlRef

    outside = tmp_path / "secret.png"
    outside.write_bytes(png((9, 9, 9)))
    folder = tmp_path / "processed" / "0001-poses"
    folder.mkdir(parents=True)
    (folder / "pose.png").symlink_to(outside)
    with pytest.raises(StageError, match=r"pose\.png is a symbolic link"):
        control_image(ControlRef(image=str(folder / "pose.png")), "image[0]")
