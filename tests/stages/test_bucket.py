"""The bucket stage: bucket geometry, crop plans, and whole runs over awkward datasets."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dropkiln.config import BucketSettings
from dropkiln.stages import bucket as bucket_stage
from dropkiln.stages import decode_pool, get_stage
from dropkiln.stages.base import StageError, StageStopped
from dropkiln.stages.bucket import (
    MANIFEST_NAME,
    BucketResult,
    BucketSpec,
    ImageTask,
    plan_image,
    run_bucket,
)
from dropkiln.stages.bucket_manifest import (
    UNCAPPED_FILE_BYTES,
    BucketManifest,
    ManifestImage,
    Rejection,
)
from dropkiln.stages.faults import FaultInjector
from dropkiln.stages.imaging import bucket_sizes, choose_bucket, plan_crop
from dropkiln.stages.testing import LocalContext

# -- geometry -------------------------------------------------------------------------------

# min_side ≤ 512 ≤ resolution: a bucket always exists (the other case has its own test).
bucket_settings = st.builds(
    BucketSettings,
    resolution=st.integers(512, 2048),
    bucket_step=st.sampled_from([32, 64]),
    min_side=st.integers(32, 512),
    max_side=st.integers(1024, 4096),
)
image_sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))


@settings(max_examples=50)
@given(bucket_settings)
def test_every_bucket_respects_area_step_and_side_bounds(bucket: BucketSettings) -> None:
    buckets = bucket_sizes(bucket)
    assert buckets
    for width, height in buckets:
        assert width * height <= bucket.resolution**2
        assert width % bucket.bucket_step == 0 and height % bucket.bucket_step == 0
        assert bucket.min_side <= width <= bucket.max_side
        assert bucket.min_side <= height <= bucket.max_side


@settings(max_examples=50)
@given(bucket_settings, image_sizes)
def test_chosen_bucket_has_the_least_aspect_error(
    bucket: BucketSettings, size: tuple[int, int]
) -> None:
    buckets = bucket_sizes(bucket)
    chosen = choose_bucket(size, buckets)

    def error(bucket: tuple[int, int]) -> float:
        return abs(math.log(bucket[0] / bucket[1]) - math.log(size[0] / size[1]))

    assert chosen in buckets
    assert error(chosen) <= min(error(bucket) for bucket in buckets) + 1e-12


@pytest.mark.parametrize(
    ("step", "size", "expected"),
    [
        (64, (1000, 1000), (1024, 1024)),
        (64, (3000, 2000), (1216, 832)),  # 3:2 → 1.46
        (64, (2000, 3000), (832, 1216)),
        (64, (1920, 1080), (1344, 768)),  # 16:9 → 1.75
        (64, (4000, 400), (2048, 512)),  # 10:1 → the widest bucket (max_side)
        (32, (3000, 2000), (1248, 832)),  # step 32 fits 3:2 exactly
        (32, (1920, 1080), (1344, 768)),  # 1.75 still beats 1376x736 (1.87)
    ],
)
def test_bucket_choice_examples(
    step: int, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert choose_bucket(size, bucket_sizes(BucketSettings(bucket_step=step))) == expected


def test_ties_go_to_the_larger_then_the_narrower_bucket() -> None:
    assert choose_bucket((100, 100), [(960, 1024), (1024, 960)]) == (960, 1024)
    assert choose_bucket((100, 100), [(512, 512), (1024, 1024)]) == (1024, 1024)


def test_no_bucket_fits_is_a_stage_error() -> None:
    settings = BucketSettings(resolution=512, min_side=1024, max_side=2048)
    with pytest.raises(StageError, match="no bucket fits resolution 512"):
        bucket_sizes(settings)


def test_centre_crop_math() -> None:
    plan = plan_crop((300, 200), (1216, 832), random_crop=False, crop_seed="x")
    assert plan.resized_size == (1248, 832)
    assert plan.crop_box == (16, 0, 1232, 832)
    plan = plan_crop((200, 300), (832, 1216), random_crop=False, crop_seed="x")
    assert (plan.resized_size, plan.crop_box) == ((832, 1248), (0, 16, 832, 1232))


@settings(max_examples=50)
@given(image_sizes, st.sampled_from(bucket_sizes(BucketSettings())), st.booleans(), st.text())
def test_crop_box_lies_in_the_resized_image_and_has_the_bucket_size(
    size: tuple[int, int], bucket: tuple[int, int], random_crop: bool, seed: str
) -> None:
    plan = plan_crop(size, bucket, random_crop, seed)
    (resized_w, resized_h), (left, top, right, bottom) = plan.resized_size, plan.crop_box
    assert (right - left, bottom - top) == bucket
    assert 0 <= left <= right <= resized_w and 0 <= top <= bottom <= resized_h
    assert resized_w == bucket[0] or resized_h == bucket[1]  # covers, no bigger than needed
    # The aspect ratio survives resizing, up to rounding of the longer-than-needed side.
    assert abs(resized_w * size[1] - resized_h * size[0]) <= max(size)
    assert plan == plan_crop(size, bucket, random_crop, seed)


def test_random_crop_depends_on_the_seed() -> None:
    boxes = {
        plan_crop((4000, 1000), (1024, 1024), True, f"{seed}/a.png").crop_box for seed in range(8)
    }
    assert len(boxes) > 1


# -- running the stage ----------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


def run(
    dataset: Path, tmp_path: Path, label: str = "run", **settings: Any
) -> tuple[BucketResult, LocalContext]:
    seed = settings.pop("seed", 1)
    faults = settings.pop("faults", "")
    stop_after = settings.pop("stop_after", None)
    ctx = LocalContext(
        root=tmp_path,
        work_dir=tmp_path / "work" / label,
        faults=FaultInjector(faults),
        stop_after=stop_after,
    )
    spec = BucketSpec(
        dataset_dir=str(dataset),
        name="cats",
        bucket=BucketSettings(**{"resolution": 256, "min_side": 64, "workers": 1, **settings}),
        seed=seed,
    )
    return run_bucket(spec, ctx), ctx


@pytest.fixture
def awkward_dataset(tmp_path: Path) -> Path:
    """Good images of several kinds plus one of every kind of bad file."""
    folder = tmp_path / "cats"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    good = {
        "wide.png": encode(noise((96, 48)), "PNG"),
        "rotated.jpg": encode(noise((60, 40)), "JPEG", exif=exif.tobytes()),
        "alpha.png": encode(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"),
        "sub/tall.webp": encode(noise((40, 80)), "WEBP"),
        "copy.png": encode(noise((96, 48)), "PNG"),
    }
    good["copy.png"] = good["wide.png"]
    truncated = encode(noise((64, 64)), "PNG")
    bad = {
        "empty.png": b"",
        "truncated.png": truncated[: len(truncated) // 2],
        "text.png": b"definitely not a png\n",
        "latin.png": encode(noise((32, 32)), "PNG"),
    }
    for name, data in {**good, **bad}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "wide.txt").write_text("a wide cat,\nstripes", encoding="utf-8")
    (folder / "latin.txt").write_bytes("un café".encode("latin-1"))
    (folder / "README.md").write_text("my cats")
    return folder


def test_run_plans_good_images_and_lists_bad_ones(awkward_dataset: Path, tmp_path: Path) -> None:
    result, ctx = run(awkward_dataset, tmp_path)

    manifest_path = tmp_path / "work" / "run" / MANIFEST_NAME
    assert result.manifest == str(manifest_path)
    assert ctx.artifacts == [(manifest_path, "manifest")]
    assert (result.images, result.rejected) == (6, 5)
    reasons = {item.path: item.reason for item in result.rejections}
    assert reasons == {
        "README.md": "not used: .md is not an image type dropkiln reads",
        "empty.png": "empty file (0 bytes)",
        "latin.png": "caption latin.txt is not UTF-8 (byte 0xe9 at offset 6); save it as UTF-8",
        "text.png": reasons["text.png"],
        "truncated.png": reasons["truncated.png"],
    }
    assert reasons["text.png"].startswith("not an image in a supported format")
    assert reasons["truncated.png"].startswith("cannot decode PNG data")

    manifest = BucketManifest.load(manifest_path)
    assert manifest.name == "cats" and manifest.dataset_dir == str(awkward_dataset)
    assert manifest.settings.resolution == 256 and manifest.settings.seed == 1
    images = {image.path: image for image in manifest.images}
    assert list(images) == sorted(images)
    assert set(images) == {
        "alpha.png",
        "cmyk.jpg",
        "copy.png",
        "rotated.jpg",
        "sub/tall.webp",
        "wide.png",
    }
    assert images["rotated.jpg"].original_size == (40, 60)
    assert images["wide.png"].caption == "a wide cat, stripes"
    assert images["alpha.png"].caption == ""
    assert "transparent pixels composited over white" in images["alpha.png"].notes
    assert images["cmyk.jpg"].source_mode == "CMYK"
    assert "same bytes as copy.png" in images["wide.png"].notes  # the first in path order
    assert images["copy.png"].sha256 == images["wide.png"].sha256
    assert sum(manifest.buckets.values()) == 6
    assert result.buckets == manifest.buckets
    assert [r.path for r in manifest.rejected] == sorted(reasons)

    last_done, total, metrics = ctx.progress_log[-1]
    assert (last_done, total) == (10, 10)
    assert metrics == {"images_ok": 6, "rejected": 5}


def test_manifest_image_fields(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    data = encode(noise((300, 200)), "PNG")
    (folder / "a.png").write_bytes(data)
    result, _ = run(folder, tmp_path, resolution=1024, min_side=256)
    image = BucketManifest.load(result.manifest).images[0]
    assert image.path == "a.png"
    assert (image.original_size, image.bucket, image.resized_size) == (
        (300, 200),
        (1216, 832),
        (1248, 832),
    )
    assert image.crop_box == (16, 0, 1232, 832)
    assert (image.crop_left, image.crop_top) == (16, 0)
    assert (image.crop_top_left, image.flipped_crop_top_left) == ((0, 16), (0, 16))
    assert (image.source_format, image.source_mode) == ("PNG", "RGB")
    assert image.notes == ["upscaled ×4.16 to cover the 1216x832 bucket"]
    raw = json.loads(Path(result.manifest).read_text())
    assert raw["format"] == "dropkiln.bucket-manifest" and raw["version"] == 1
    assert raw["images"][0]["crop_box"] == [16, 0, 1232, 832]


def test_decompression_bomb_and_huge_caption_are_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "big.png").write_bytes(encode(noise((128, 128)), "PNG"))
    (folder / "ok.png").write_bytes(encode(noise((64, 64)), "PNG"))
    (folder / "talky.png").write_bytes(encode(noise((64, 64)), "PNG"))
    (folder / "talky.txt").write_text("word " * 100)
    result, _ = run(folder, tmp_path, max_pixels=64 * 64, max_caption_bytes=100)
    assert result.images == 1
    assert [item.reason for item in result.rejections] == [
        "128×128 = 16384 pixels is over max_pixels=4096 (decompression bomb guard)",
        "caption talky.txt is 500 bytes, over max_caption_bytes=100",
    ]


def test_parallel_manifest_equals_serial_manifest(awkward_dataset: Path, tmp_path: Path) -> None:
    serial, _ = run(awkward_dataset, tmp_path, "serial", workers=1, random_crop=True)
    parallel, ctx = run(awkward_dataset, tmp_path, "parallel", workers=2, random_crop=True)
    assert Path(serial.manifest).read_bytes() == Path(parallel.manifest).read_bytes()
    assert ctx.progress_log[-1][:2] == (10, 10)


def test_runs_are_deterministic_and_the_seed_moves_random_crops(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    for index in range(4):
        (folder / f"{index}.png").write_bytes(encode(noise((200 + 40 * index, 64)), "PNG"))
    first, _ = run(folder, tmp_path, "first", random_crop=True, seed=3)
    again, _ = run(folder, tmp_path, "again", random_crop=True, seed=3)
    other, _ = run(folder, tmp_path, "other", random_crop=True, seed=4)
    assert Path(first.manifest).read_bytes() == Path(again.manifest).read_bytes()
    boxes = [
        [image.crop_box for image in BucketManifest.load(result.manifest).images]
        for result in (first, other)
    ]
    assert boxes[0] != boxes[1]


def test_empty_dataset_is_a_stage_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(StageError, match="no usable image in dataset cats: no files found"):
        run(folder, tmp_path)


def test_dataset_without_a_usable_image_names_the_first_reasons(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.png").write_bytes(b"text")
    with pytest.raises(StageError) as caught:
        run(folder, tmp_path)
    assert str(caught.value).startswith(
        "no usable image in dataset cats: 2 files rejected (a.png: empty file (0 bytes); b.png:"
    )
    assert not (tmp_path / "work" / "run" / MANIFEST_NAME).exists()


def test_missing_dataset_folder_is_a_stage_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="does not exist"):
        run(tmp_path / "gone", tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_request_stops_between_chunks_without_a_manifest(
    awkward_dataset: Path, tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode_pool, "STOP_CHECK_EVERY", 4)
    with pytest.raises(StageStopped, match="stopped after 4 files"):
        run(awkward_dataset, tmp_path, workers=workers, stop_after=2)
    assert not (tmp_path / "work" / "run" / MANIFEST_NAME).exists()


def test_fault_point_fires_once_per_image(awkward_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"No space left on device: injected at bucket\.image"):
        run(awkward_dataset, tmp_path, faults="enospc@bucket.image:10")
    result, ctx = run(awkward_dataset, tmp_path, faults="enospc@bucket.image:11")
    assert ctx.faults.hits == {"bucket.image": 10, "bucket.decode": 10}
    assert result.images == 6


def plan_or_crash(task: ImageTask) -> ManifestImage | Rejection:
    """A decoder that kills its process on one file (picklable: workers import this module)."""
    if task.relative == "crash.png":
        os._exit(70)
    return plan_image(task)


def test_a_worker_crash_rejects_only_its_file(
    awkward_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (awkward_dataset / "crash.png").write_bytes(encode(noise((64, 64)), "PNG"))
    monkeypatch.setattr(bucket_stage, "plan_image", plan_or_crash)
    result, ctx = run(awkward_dataset, tmp_path, workers=2)
    assert result.images == 6
    reasons = {item.path: item.reason for item in result.rejections}
    assert reasons["crash.png"] == "the decoder crashed on this file"
    assert len(reasons) == 6
    assert ctx.progress_log[-1][:2] == (11, 11)


def test_stage_definition() -> None:
    stage = get_stage("bucket")
    assert (stage.name, stage.lane, stage.spec, stage.priority) == ("bucket", "cpu", BucketSpec, 5)
    assert stage.run is run_bucket


@pytest.fixture
def manifest_json(tmp_path: Path) -> dict[str, Any]:
    """A manifest as the bucket stage writes it, as JSON values."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(noise((300, 200)), "PNG"))
    result, _ = run(folder, tmp_path, resolution=256, min_side=64)
    data: dict[str, Any] = json.loads(Path(result.manifest).read_text())
    return data


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("missing", "is unreadable"),
        ("not json", "is not JSON"),
        ("other format", "is not a bucket manifest"),
        ("version 2", "is format version 2, which this dropkiln does not read .* drop the dataset"),
        ("no images", "is damaged: .*images"),
        ("crop box", r"is damaged: .*a\.png: crop box \(0, 0, 10, 10\) is not the bucket"),
    ],
)
def test_a_manifest_that_cannot_be_used_says_why(
    tmp_path: Path, manifest_json: dict[str, Any], damage: str, reason: str
) -> None:
    path = tmp_path / "manifest.json"
    if damage == "not json":
        path.write_text("{")
    elif damage == "other format":
        path.write_text(json.dumps({**manifest_json, "format": "dropkiln.latent-cache"}))
    elif damage == "version 2":
        path.write_text(json.dumps({**manifest_json, "version": 2}))
    elif damage == "no images":
        path.write_text(json.dumps({k: v for k, v in manifest_json.items() if k != "images"}))
    elif damage == "crop box":
        manifest_json["images"][0]["crop_box"] = [0, 0, 10, 10]
        path.write_text(json.dumps(manifest_json))
    with pytest.raises(StageError, match=reason):
        BucketManifest.load(path)


def test_a_manifest_from_before_max_file_bytes_reads_its_images_uncapped(
    tmp_path: Path, manifest_json: dict[str, Any]
) -> None:
    """Manifests written before the file size cap existed still load; the bucket stage
    that wrote them read every image whatever its size, so the cache does too."""
    del manifest_json["settings"]["max_file_bytes"]
    path = tmp_path / "old-manifest.json"
    path.write_text(json.dumps(manifest_json, indent=1))
    manifest = BucketManifest.load(path)
    assert manifest.settings.max_file_bytes == UNCAPPED_FILE_BYTES
    assert manifest.bucket_pixels(manifest.images[0]).size == manifest.images[0].bucket


def test_the_manifest_model_writes_the_bytes_it_read(
    tmp_path: Path, manifest_json: dict[str, Any]
) -> None:
    """The manifest's one model reads the stage's file and writes it back unchanged."""
    text = json.dumps(manifest_json, indent=1, ensure_ascii=False)
    path = tmp_path / "manifest.json"
    path.write_text(text)
    assert BucketManifest.load(path).model_dump_json(indent=1) == text
