"""Dataset folders: image discovery, captions, dataset.toml, hashing and zip extraction."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dropkiln.options import BucketSettings, TrainSettings
from dropkiln.stages.base import StageError
from dropkiln.stages.dataset import (
    CaptionError,
    DatasetOptions,
    dataset_hash,
    find_images,
    load_dataset_options,
    read_caption,
    scan_dataset,
)
from dropkiln.stages.dataset_zip import extract_zip_safely


def png_bytes(size: tuple[int, int] = (8, 8), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def defaults() -> DatasetOptions:
    """The daemon's defaults (dropkiln.toml) that a dataset.toml overrides."""
    return DatasetOptions("tiny-shapes", BucketSettings(), TrainSettings())


# -- finding images -------------------------------------------------------------------------


def test_find_images_walks_subfolders_sorted_and_skips_hidden_and_junk(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.png", "z.tiff"]:
        write(tmp_path / name, png_bytes())
    for name in [".hidden.png", ".cache/e.png", "__MACOSX/._a.JPG", "sub/._c.webp"]:
        write(tmp_path / name, png_bytes())
    write(tmp_path / "a.txt", "caption")
    write(tmp_path / "b.caption", "caption")
    write(tmp_path / "dataset.toml", "steps = 10")
    write(tmp_path / "notes.md", "hello")
    write(tmp_path / "sub/dataset.toml", "not the options file")

    found = [path.relative_to(tmp_path).as_posix() for path in find_images(tmp_path)]
    listing = scan_dataset(tmp_path)

    assert found == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.png", "z.tiff"]
    assert [path.relative_to(tmp_path).as_posix() for path in listing.others] == [
        "notes.md",
        "sub/dataset.toml",
    ]


def test_links_to_files_and_folders_are_listed_apart_and_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "library"
    write(outside / "kept.png", png_bytes())
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "linked.png").symlink_to(outside / "kept.png")
    (dataset / "folder").symlink_to(outside, target_is_directory=True)

    assert find_images(dataset) == []
    assert [path.name for path in scan_dataset(dataset).links] == ["folder", "linked.png"]


def test_missing_folder_is_a_stage_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="does not exist"):
        find_images(tmp_path / "nope")


# -- captions -------------------------------------------------------------------------------


def test_caption_from_txt_before_caption_file_with_whitespace_collapsed(tmp_path: Path) -> None:
    image = write(tmp_path / "cat.png", png_bytes())
    write(tmp_path / "cat.caption", "from .caption")
    assert read_caption(image, 1000) == "from .caption"
    write(tmp_path / "cat.txt", "\ufeffa photo of sks cat,\r\n  red hair\n")
    assert read_caption(image, 1000) == "a photo of sks cat, red hair"


def test_missing_caption_is_empty(tmp_path: Path) -> None:
    assert read_caption(write(tmp_path / "cat.png", png_bytes()), 1000) == ""


def test_latin1_caption_is_refused_with_the_offending_byte(tmp_path: Path) -> None:
    image = write(tmp_path / "cat.png", png_bytes())
    write(tmp_path / "cat.txt", "un café, crème".encode("latin-1"))
    with pytest.raises(CaptionError, match=r"cat\.txt is not UTF-8 \(byte 0xe9 at offset 6\)"):
        read_caption(image, 1000)


def test_huge_caption_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    image = write(tmp_path / "cat.png", png_bytes())
    write(tmp_path / "cat.txt", "tag, " * 10_000)
    with pytest.raises(CaptionError, match="50000 bytes, over max_caption_bytes=1000"):
        read_caption(image, 1000)


def test_binary_caption_is_refused(tmp_path: Path) -> None:
    image = write(tmp_path / "cat.png", png_bytes())
    write(tmp_path / "cat.txt", b"tag\x00\x00")
    with pytest.raises(CaptionError, match="NUL"):
        read_caption(image, 1000)


# -- dataset.toml ---------------------------------------------------------------------------


def test_without_dataset_toml_the_settings_defaults_apply(
    tmp_path: Path, defaults: DatasetOptions
) -> None:
    options = load_dataset_options(tmp_path, defaults)
    model, bucket, train = options.model, options.bucket, options.train
    assert (model, bucket, train) == (defaults.model, defaults.bucket, defaults.train)
    assert options.vae == defaults.vae == ""
    assert bucket is not defaults.bucket


def test_dataset_toml_names_a_vae(tmp_path: Path, defaults: DatasetOptions) -> None:
    write(tmp_path / "dataset.toml", 'vae = "/vaes/sdxl_vae.safetensors"\n')
    assert load_dataset_options(tmp_path, defaults).vae == "/vaes/sdxl_vae.safetensors"
    write(tmp_path / "dataset.toml", "vae = 3\n")
    with pytest.raises(StageError, match=r"dataset\.toml: vae should be a string"):
        load_dataset_options(tmp_path, defaults)


def test_dataset_toml_pins_a_device_class(tmp_path: Path, defaults: DatasetOptions) -> None:
    assert load_dataset_options(tmp_path, defaults).device_class is None
    write(tmp_path / "dataset.toml", 'device_class = "24gb"\n')
    assert load_dataset_options(tmp_path, defaults).device_class == "24gb"


@pytest.mark.parametrize("value", ['""', "24", '"two words"', "[]"])
def test_a_bad_device_class_in_dataset_toml_names_the_file_and_field(
    tmp_path: Path, defaults: DatasetOptions, value: str
) -> None:
    write(tmp_path / "dataset.toml", f"device_class = {value}\n")
    with pytest.raises(StageError, match=r"dataset\.toml: device_class should be"):
        load_dataset_options(tmp_path, defaults)


def test_dataset_toml_overrides_flat_keys(tmp_path: Path, defaults: DatasetOptions) -> None:
    write(
        tmp_path / "dataset.toml",
        """
        model = "tiny-sd15"
        resolution = 512
        bucket_step = 32
        random_crop = true
        steps = 300
        checkpoint_every = 50
        rank = 8
        learning_rate = 1     # an integer is a fine float
        seed = 7
        validation_prompts = ["a photo of sks cat"]
        tag_weights = { "red hair" = 2.0 }
        """,
    )
    model, bucket, train, *_ = load_dataset_options(tmp_path, defaults)
    assert model == "tiny-sd15"
    assert (bucket.resolution, bucket.bucket_step, bucket.random_crop) == (512, 32, True)
    assert bucket.min_side == defaults.bucket.min_side
    assert (train.steps, train.checkpoint_every, train.rank, train.seed) == (300, 50, 8, 7)
    assert train.learning_rate == 1.0
    assert train.validation_prompts == ["a photo of sks cat"]
    assert train.tag_weights == {"red hair": 2.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stepz = 10", r"unknown key 'stepz' \(did you mean 'steps'\?\)"),
        ("flavour = 'mint'", r"unknown key 'flavour'$"),
        ("[train]\nsteps = 10", r"unknown key 'train': keys are flat"),
        ("max_pixels = 10000000000", "'max_pixels' is a daemon limit"),
        ("resolution = '1024'", r"resolution: Input should be a valid integer \(got '1024'\)"),
        ("random_crop = 'yes'", r"random_crop: Input should be a valid boolean"),
        ("bucket_step = 48", "bucket_step: Input should be 32 or 64"),
        ("steps = 0", "steps: Input should be greater than or equal to 1"),
        ("tag_weights = { cat = 'x' }", r"tag_weights\.cat: Input should be a valid number"),
        ("model = 3", "model should be a non-empty string"),
        ("min_side = 1024\nmax_side = 512", r"min_side \(1024\) is larger than max_side"),
        ("steps = = 10", r"malformed TOML: .*\(at line 1, column 9\)"),
        ("a = 1\nb = [1,,]", r"malformed TOML: .*\(at line 2, column 8\)"),
    ],
)
def test_bad_dataset_toml_is_a_stage_error_naming_file_and_key(
    tmp_path: Path, defaults: DatasetOptions, text: str, message: str
) -> None:
    options = write(tmp_path / "dataset.toml", text)
    with pytest.raises(StageError, match=message) as caught:
        load_dataset_options(tmp_path, defaults)
    assert str(caught.value).startswith(str(options))


def test_dataset_toml_that_is_not_utf8(tmp_path: Path, defaults: DatasetOptions) -> None:
    write(tmp_path / "dataset.toml", 'model = "caf\xe9"'.encode("latin-1"))
    with pytest.raises(StageError, match="not UTF-8"):
        load_dataset_options(tmp_path, defaults)


# -- hashing --------------------------------------------------------------------------------


def make_dataset(folder: Path) -> Path:
    write(folder / "a.png", png_bytes())
    write(folder / "a.txt", "a cat")
    write(folder / "sub/b.png", png_bytes(color="blue"))
    write(folder / "dataset.toml", "steps = 10")
    return folder


def test_same_content_in_another_folder_hashes_the_same(tmp_path: Path) -> None:
    first = make_dataset(tmp_path / "one")
    second = make_dataset(tmp_path / "two")
    write(second / ".DS_Store", b"finder junk")
    assert dataset_hash(first) == dataset_hash(second)


@pytest.mark.parametrize(
    "change",
    [
        lambda folder: write(folder / "a.txt", "a dog"),
        lambda folder: (folder / "sub/b.png").rename(folder / "sub/c.png"),
        lambda folder: write(folder / "extra.png", png_bytes()),
        lambda folder: (folder / "dataset.toml").unlink(),
    ],
)
def test_any_content_change_changes_the_hash(tmp_path: Path, change) -> None:
    folder = make_dataset(tmp_path / "one")
    before = dataset_hash(folder)
    change(folder)
    assert dataset_hash(folder) != before


# -- zip extraction -------------------------------------------------------------------------


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def assert_nothing_extracted(tmp_path: Path, dest: Path) -> None:
    assert not dest.exists()
    assert not list(tmp_path.rglob("*.unzip"))
    assert not list(tmp_path.parent.rglob("evil.txt"))


def test_zip_extracts_into_dest(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "cats.zip",
        {"a.png": png_bytes(), "a.txt": b"a cat", "sub/b.png": png_bytes(), "__MACOSX/._a": b"x"},
    )
    folder = extract_zip_safely(archive, tmp_path / "out" / "cats")
    assert folder == tmp_path / "out" / "cats"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "a.png",
        "a.txt",
        "sub/b.png",
    ]
    assert (folder / "a.txt").read_bytes() == b"a cat"


def test_zip_with_one_top_folder_returns_that_folder(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "cats.zip", {"cats/a.png": png_bytes(), "cats/dataset.toml": b""})
    folder = extract_zip_safely(archive, tmp_path / "out")
    assert folder == tmp_path / "out" / "cats"
    assert (folder / "dataset.toml").is_file()


@pytest.mark.parametrize(
    "name",
    ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt", "..\\evil.txt", "C:/evil.txt", "c:evil"],
)
def test_zip_entry_escaping_dest_refuses_the_zip(tmp_path: Path, name: str) -> None:
    archive = make_zip(tmp_path / "bad.zip", {"a.png": png_bytes(), name: b"pwned"})
    dest = tmp_path / "out" / "bad"
    with pytest.raises(StageError, match="would land outside the dataset"):
        extract_zip_safely(archive, dest)
    assert_nothing_extracted(tmp_path, dest)


def test_zip_symlink_entry_is_refused_and_never_followed(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bad.zip", {"a.png": png_bytes()}, {"link.png": "/etc/passwd"})
    dest = tmp_path / "out" / "bad"
    with pytest.raises(StageError, match=r"'link\.png' is a symbolic link"):
        extract_zip_safely(archive, dest)
    assert_nothing_extracted(tmp_path, dest)


def test_zip_with_too_many_files(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "many.zip", {f"{i}.txt": b"x" for i in range(6)})
    with pytest.raises(StageError, match="6 files, over the limit of 5"):
        extract_zip_safely(archive, tmp_path / "out", max_files=5)


def test_zip_with_too_many_bytes(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "big.zip", {"a.bin": bytes(range(256)) * 8})
    with pytest.raises(StageError, match="2048 bytes uncompressed, over the limit of 1000"):
        extract_zip_safely(archive, tmp_path / "out", max_bytes=1000)


def test_zip_bomb_ratio_guard(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.png": bytes(8 * 2**20)})
    dest = tmp_path / "out"
    with pytest.raises(StageError, match=r"expands 8388608 bytes from \d+ .*zip bomb"):
        extract_zip_safely(archive, dest)
    assert_nothing_extracted(tmp_path, dest)


def test_zip_with_duplicate_entries_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a.txt", b"one")
        handle.writestr("./a.txt", b"two")  # a different name to zipfile, the same file to us
    with pytest.raises(StageError, match="appears twice"):
        extract_zip_safely(archive, tmp_path / "out")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_zip_is_a_stage_error(tmp_path: Path, cut: float) -> None:
    good = make_zip(tmp_path / "good.zip", {"a.png": png_bytes((64, 64)), "b.txt": b"x" * 500})
    data = good.read_bytes()
    truncated = write(tmp_path / "cut.zip", data[: int(len(data) * cut)])
    dest = tmp_path / "out" / "cut"
    with pytest.raises(StageError, match=r"cut\.zip is damaged or not a zip"):
        extract_zip_safely(truncated, dest)
    assert_nothing_extracted(tmp_path, dest)


def test_corrupt_entry_data_is_a_stage_error(tmp_path: Path) -> None:
    good = make_zip(tmp_path / "good.zip", {"a.txt": b"hello dataset " * 100})
    data = bytearray(good.read_bytes())
    data[40] ^= 0xFF  # inside the first entry's compressed bytes
    damaged = write(tmp_path / "damaged.zip", bytes(data))
    with pytest.raises(StageError, match="damaged"):
        extract_zip_safely(damaged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_file_and_folder_of_the_same_name_is_a_stage_error(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "clash.zip", {"a": b"a file", "a/b.png": png_bytes()})
    with pytest.raises(StageError, match=r"cannot extract clash\.zip"):
        extract_zip_safely(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_existing_dest_is_not_overwritten(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "cats.zip", {"a.png": png_bytes()})
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match="already exists"):
        extract_zip_safely(archive, tmp_path / "out")


segment = st.sampled_from(["a", "b.png", "..", ".", "", "C:", "/", "\\", "x..y", "..."])


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # the fuzz repeats names
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(st.lists(segment, min_size=1, max_size=4).map("/".join), max_size=4))
def test_zip_extraction_never_writes_outside_dest(tmp_path: Path, names: list[str]) -> None:
    case = Path(tmp_path, f"case{len(list(tmp_path.iterdir()))}")
    case.mkdir()
    archive = case / "fuzz.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for index, name in enumerate(names):
            handle.writestr(zipfile.ZipInfo(name or "empty"), f"entry {index}".encode())
    dest = case / "inside" / "dest"
    try:
        folder = extract_zip_safely(archive, dest)
    except StageError:
        assert not dest.exists()
    else:
        assert folder.is_relative_to(dest)
    written = [path for path in case.rglob("*") if path.is_file() and path != archive]
    assert all(path.is_relative_to(dest) for path in written)
