"""``dropkiln submit PATH``: the same as dropping PATH, without a half copy ever in view."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dropkiln.config import Settings

PROMPT_SUFFIXES = (".toml", ".json", ".txt")


def guess_kind(path: Path) -> str:
    if path.is_file() and path.suffix.lower() in PROMPT_SUFFIXES:
        return "prompts"
    if path.is_dir() and not any(
        p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
        for p in path.iterdir()
    ):
        return "prompts"
    return "dataset"


def drop_folder(settings: Settings, kind: str) -> Path:
    """Where a drop of this kind goes (made if missing)."""
    folder = settings.paths.datasets if kind == "dataset" else settings.paths.prompts
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def reveal(hidden: Path, target: Path) -> Path:
    """The one rename that puts a completely written drop in the watcher's view.

    ``hidden`` is in the same folder tree (a hidden name the watcher ignores), so the rename
    is atomic: the daemon sees nothing, then the whole drop.
    """
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} already exists: the daemon has not taken it yet")
    os.rename(hidden, target)
    return target


def submit(path: Path, settings: Settings, kind: str | None = None) -> Path:
    """Copy PATH into the drop folder under a hidden name, then rename it into view."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    kind = kind or guess_kind(path)
    folder = drop_folder(settings, kind)
    target = folder / path.name
    if target.exists():
        raise FileExistsError(f"{target} already exists: the daemon has not taken it yet")
    hidden = folder / f".{path.name}.part"
    if path.is_dir():
        shutil.copytree(path, hidden, symlinks=True)
    else:
        shutil.copy2(path, hidden)
    return reveal(hidden, target)
