"""Bad dataset drops: folders, links, archives and dataset.toml files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.reliability import corpus_files as f
from tests.reliability.corpus import DropCase, JobFails, Rejected


def _dataset(
    files: dict[str, bytes | str] | None = None, images: int = 2
) -> Callable[[Path], Path]:
    """A small good dataset named after the case, plus (or overriding) ``files``."""

    def build(staging: Path) -> Path:
        folder = f.good_dataset(staging, images=images, seed=sum(staging.name.encode()))
        for name, content in (files or {}).items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        return folder

    return build


def _zip(
    entries: dict[str, bytes], symlinks: dict[str, str] | None = None
) -> Callable[[Path], Path]:
    def build(staging: Path) -> Path:
        return f.write_zip(staging.with_name(staging.name + ".zip"), entries, symlinks)

    return build


def _symlink_out(staging: Path) -> Path:
    """A symlink in the drop folder pointing at a real dataset outside it."""
    outside = f.good_dataset(staging.with_name(staging.name + "-outside"))
    staging.symlink_to(outside, target_is_directory=True)
    return staging


def _dataset_with_link_out(staging: Path) -> Path:
    folder = f.good_dataset(staging)
    (folder / "passwd.png").symlink_to("/etc/passwd")
    return folder


def _empty_folder(staging: Path) -> Path:
    staging.mkdir()
    return staging


def _all_bad_images(staging: Path) -> Path:
    staging.mkdir()
    (staging / "a.png").write_bytes(b"")
    (staging / "b.jpg").write_bytes(b"not a jpeg at all")
    return staging


def _captions_only(staging: Path) -> Path:
    staging.mkdir()
    (staging / "a.txt").write_text("a caption without its picture")
    return staging


def _truncated_zip(staging: Path) -> Path:
    whole = f.write_zip(staging.with_name(staging.name + ".full"), {"a.png": f.png_bytes()})
    path = staging.with_name(staging.name + ".zip")
    path.write_bytes(whole.read_bytes()[:60])
    os.unlink(whole)
    return path


def _not_a_zip(staging: Path) -> Path:
    path = staging.with_name(staging.name + ".tar")
    path.write_bytes(b"ustar\x00" + bytes(500))
    return path


DATASET_CASES = [
    # Folders, links and archives
    DropCase("empty-folder", "dataset", _empty_folder, Rejected(r"the drop is empty")),
    DropCase(
        "symlink-out",
        "dataset",
        _symlink_out,
        Rejected(r"symlink-out is a symlink; dropkiln reads only real files"),
    ),
    DropCase(
        "link-inside",
        "dataset",
        _dataset_with_link_out,
        Rejected(r"passwd.png is a symlink; dropkiln reads only real files"),
    ),
    DropCase(
        "zip-slip",
        "dataset",
        _zip({"ok.png": f.png_bytes(), "../../evil.png": b"x"}),
        Rejected(r"entry '\.\./\.\./evil\.png' would land outside the dataset"),
    ),
    DropCase(
        "zip-absolute",
        "dataset",
        _zip({"/tmp/evil.png": b"x"}),
        Rejected(r"entry '/tmp/evil\.png' would land outside the dataset"),
    ),
    DropCase(
        "zip-symlink",
        "dataset",
        _zip({"a.png": f.png_bytes()}, {"b.png": "/etc/passwd"}),
        Rejected(r"entry 'b\.png' is a symbolic link"),
    ),
    DropCase(
        "zip-bomb", "dataset", _zip({"zeros.png": bytes(4 * 2**20)}), Rejected(r"a zip bomb\?")
    ),
    DropCase(
        "zip-truncated",
        "dataset",
        _truncated_zip,
        Rejected(r"zip-truncated\.zip is damaged or not a zip"),
    ),
    DropCase(
        "not-a-zip", "dataset", _not_a_zip, Rejected(r"a dataset is a folder of images or a \.zip")
    ),
    DropCase(
        "all-images-bad",
        "dataset",
        _all_bad_images,
        JobFails("bucket", r"no usable image in dataset all-images-bad: 2 files rejected"),
    ),
    DropCase(
        "captions-only",
        "dataset",
        _captions_only,
        JobFails("bucket", r"no usable image in dataset captions-only"),
    ),
    # dataset.toml
    DropCase(
        "toml-malformed",
        "dataset",
        _dataset({"dataset.toml": "steps = = 3\n"}),
        Rejected(r"dataset\.toml: malformed TOML"),
    ),
    DropCase(
        "toml-wrong-type",
        "dataset",
        _dataset({"dataset.toml": 'steps = "many"\n'}),
        Rejected(r"steps: Input should be a valid integer \(got 'many'\)"),
    ),
    DropCase(
        "toml-unknown-key",
        "dataset",
        _dataset({"dataset.toml": "stepz = 100\n"}),
        Rejected(r"unknown key 'stepz' \(did you mean 'steps'\?\)"),
    ),
    DropCase(
        "toml-negative-steps",
        "dataset",
        _dataset({"dataset.toml": "steps = -5\n"}),
        Rejected(r"steps: Input should be greater than or equal to 1 \(got -5\)"),
    ),
    DropCase(
        "toml-absurd-steps",
        "dataset",
        _dataset({"dataset.toml": "steps = 1000000000000\n"}),
        Rejected(r"steps: Input should be less than or equal to 10000000"),
    ),
    DropCase(
        "toml-absurd-size",
        "dataset",
        _dataset({"dataset.toml": "resolution = 100000\n"}),
        Rejected(r"resolution: Input should be less than or equal to 4096"),
    ),
    DropCase(
        "toml-daemon-limit",
        "dataset",
        _dataset({"dataset.toml": "max_pixels = 10\n"}),
        Rejected(r"'max_pixels' is a daemon limit"),
    ),
    DropCase(
        "toml-nested",
        "dataset",
        _dataset({"dataset.toml": "[train]\nsteps = 3\n"}),
        Rejected(r"keys are flat"),
    ),
    DropCase(
        "toml-latin1",
        "dataset",
        _dataset({"dataset.toml": "seed = 1 # é\n".encode("latin-1")}),
        Rejected(r"dataset\.toml: not UTF-8"),
    ),
    DropCase(
        "toml-unknown-model",
        "dataset",
        _dataset({"dataset.toml": 'model = "no-such-model"\n'}),
        Rejected(r"model 'no-such-model' is neither tiny-shapes nor tiny-sdxl nor tiny-sd15"),
    ),
    DropCase(
        "toml-missing-vae",
        "dataset",
        _dataset({"dataset.toml": 'vae = "/nowhere/vae.safetensors"\n'}),
        Rejected(r"vae '/nowhere/vae\.safetensors': .* does not exist"),
    ),
]
