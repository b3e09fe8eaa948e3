"""A settled drop, read: its name, content hash and kept copy, its dataset or prompt file
parsed and checked, and the reason text it is rejected with. Planning turns it into jobs
(``planner``); ingestion moves it (``ingest``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dropkiln.config import Settings
from dropkiln.daemon import limits
from dropkiln.stages import StageError
from dropkiln.stages.dataset import DatasetOptions
from dropkiln.store.vocabulary import DropKind

if TYPE_CHECKING:
    from dropkiln.stages.generation.prompt_file import PromptFile

DATASET = DropKind.DATASET
PROMPTS = DropKind.PROMPTS
PROMPT_SUFFIXES = (".toml", ".json", ".txt")


def new_id() -> str:
    """128 random bits: ids never collide in practice (32 bits did, after ~65,000 jobs with
    even odds). The CLI and the dashboard show the shortest unambiguous prefix."""
    return uuid.uuid4().hex


class DropRejection(Exception):
    """A drop that cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class PromptDrop:
    """What a prompt drop asks for: its validated prompt file, and where it was dropped (the
    control, init and mask images it names are checked there, then read from processed/)."""

    prompt_file: PromptFile
    source: Path


@dataclass
class ParsedDrop:
    """A drop read and validated, not yet planned."""

    kind: DropKind
    name: str
    content_hash: str
    files: int
    bytes: int
    folder: Path
    """Where the job will read it: processed/ID-NAME, or the extraction of a zip."""
    options: DatasetOptions | PromptDrop
    """A dataset's model, bucket and train options, or a prompt drop's prompt file."""


def content_hash(entry: Path) -> tuple[str, int, int]:
    """sha256 over relative paths and bytes, with file and byte counts. Symlinks are refused."""
    digest = hashlib.sha256()
    files = total = 0
    paths = [entry] if entry.is_file() or entry.is_symlink() else sorted(entry.rglob("*"))
    for path in paths:
        if path.is_symlink():
            raise DropRejection(
                f"{path.relative_to(entry.parent)} is a symlink; dropkiln reads only real files"
            )
        if not path.is_file():
            continue
        rel = path.name if path == entry else str(path.relative_to(entry))
        digest.update(rel.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                total += len(chunk)
        files += 1
    return digest.hexdigest(), files, total


def drop_name(entry: Path) -> str:
    name = entry.name
    for suffix in (".zip", *PROMPT_SUFFIXES):
        if name.lower().endswith(suffix) and entry.is_file():
            return name[: -len(suffix)]
    return name


def stored_path(settings: Settings, drop_id: str, entry: Path) -> Path:
    return settings.paths.processed / f"{drop_id}-{entry.name}"


def parse_drop(settings: Settings, entry: Path, kind: str, drop_id: str) -> ParsedDrop:
    """Read and validate a settled drop in place (runs in a worker thread)."""
    kind = DropKind(kind)
    digest, files, size = content_hash(entry)
    if files == 0:
        raise DropRejection("the drop is empty")
    name = drop_name(entry)
    stored = stored_path(settings, drop_id, entry)
    options: DatasetOptions | PromptDrop
    if kind == DATASET:
        folder, options = _read_dataset(
            settings, entry, settings.paths.work / "drops" / drop_id / name, stored
        )
    else:
        folder, options = stored, _read_prompts(settings, entry)
    return ParsedDrop(kind, name, digest, files, size, folder, options)


def dataset_defaults(settings: Settings) -> DatasetOptions:
    """What a dataset without a dataset.toml trains with: dropkiln.toml's choices."""
    return DatasetOptions(settings.model, settings.bucket, settings.train, settings.vae)


def _read_dataset(
    settings: Settings, entry: Path, unzip_to: Path, stored: Path
) -> tuple[Path, DatasetOptions]:
    """(where the bucket job will read it, its model/bucket/train options)."""
    from dropkiln.stages.dataset import load_dataset_options
    from dropkiln.stages.dataset_zip import extract_zip_safely

    if entry.is_file():
        if entry.suffix.lower() != ".zip":
            raise DropRejection(f"{entry.name}: a dataset is a folder of images or a .zip of one")
        try:
            folder = read_from = extract_zip_safely(entry, unzip_to)
        except StageError as exc:
            raise DropRejection(str(exc)) from exc
    else:
        folder, read_from = stored, entry
    try:
        options = load_dataset_options(read_from, dataset_defaults(settings))
    except StageError as exc:
        # The user knows the zip, not where dropkiln unpacked it: "cats.zip/dataset.toml".
        reason = str(exc).replace(str(unzip_to), entry.name) if entry.is_file() else str(exc)
        raise DropRejection(reason) from exc
    try:
        limits.check_dataset(settings, options, entry.name)
    except limits.OverLimit as exc:
        raise DropRejection(str(exc)) from exc
    return folder, options


def _prompt_file_in(entry: Path) -> Path:
    """The one prompt file of a drop: the file itself, or the only one in a folder."""
    if entry.is_file():
        if entry.suffix.lower() not in PROMPT_SUFFIXES:
            raise DropRejection(f"{entry.name}: not a prompt file (expected .toml, .json or .txt)")
        return entry
    candidates = sorted(
        p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES
    )
    if len(candidates) != 1:
        raise DropRejection(
            f"{entry.name}/: a prompt folder holds exactly one .toml, .json or .txt prompt "
            f"file (found {len(candidates)})"
        )
    return candidates[0]


def _read_prompts(settings: Settings, entry: Path) -> PromptDrop:
    """The validated prompt file, and where it was dropped (for control image paths)."""
    prompt_path = _prompt_file_in(entry)
    from dropkiln.stages.generation.prompt_loading import load_prompt_file

    try:
        prompt_file = load_prompt_file(prompt_path, settings.generate)
        limits.check_prompts(settings, prompt_file, prompt_path.name)
    except (StageError, limits.OverLimit) as exc:
        raise DropRejection(str(exc)) from exc
    return PromptDrop(prompt_file, entry)


def check_model(model: str) -> None:
    """Refuse a ``model`` that names nothing, at drop time rather than when the job runs."""
    from dropkiln.stages.models import TINY_NAMES

    if model in TINY_NAMES:
        return
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return
    if path.is_file() and path.suffix == ".safetensors":
        from dropkiln.stages.models.single_file import checkpoint_family

        try:
            checkpoint_family(path)  # the header alone: SDXL base or SD 1.5, or why not
        except StageError as exc:
            raise DropRejection(f"model {model!r}: {exc}") from exc
        return
    raise DropRejection(
        f"model {model!r} is neither {' nor '.join(TINY_NAMES)}, a local diffusers folder "
        "(with model_index.json) nor a local .safetensors file; nothing is downloaded"
    )


def check_vae(vae: str) -> None:
    """Refuse a ``vae`` that is no SD/SDXL VAE file, at drop time (reads only its header)."""
    if not vae:
        return
    from dropkiln.stages.models.vae import vae_layout

    try:
        vae_layout(Path(vae).expanduser())
    except StageError as exc:
        raise DropRejection(f"vae {vae!r}: {exc}") from exc


def load_drop_modules() -> None:
    """Import now what reading and planning a drop imports lazily (prompt files, datasets,
    each stage's spec): a third of a second on a busy 2-core box, which the first drop after
    the daemon started would otherwise add to its pickup. None of them imports torch."""
    import dropkiln.stages.bucket
    import dropkiln.stages.cache
    import dropkiln.stages.dataset
    import dropkiln.stages.dataset_zip
    import dropkiln.stages.generate
    import dropkiln.stages.generation.prompt_file
    import dropkiln.stages.generation.prompt_loading
    import dropkiln.stages.train
    import dropkiln.stages.video  # noqa: F401


def error_text(name: str, drop_id: str, reason: str, at: str) -> str:
    return (
        f"dropkiln could not use the drop {name!r}.\n\n"
        f"Reason: {reason}\n\n"
        f"Drop id: {drop_id}\nRejected at: {at}\n"
        f"Fix the problem and drop it again; this copy is kept here untouched.\n"
    )


def unique_path(path: Path, taken: Collection[Path] = ()) -> Path:
    """``path`` or ``path-2``, ``path-3``… whichever does not exist yet and is not taken."""
    if not os.path.lexists(path) and path not in taken:
        return path
    stem, suffix = (path.stem, path.suffix) if path.is_file() else (path.name, "")
    for n in range(2, 10_000):
        candidate = path.with_name(f"{stem}-{n}{suffix}")
        if not os.path.lexists(candidate) and candidate not in taken:
            return candidate
    raise FileExistsError(path)
