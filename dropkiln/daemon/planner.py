"""From a settled drop to the jobs that turn it into outputs.

A dataset becomes bucket → cache → train; a prompt file becomes generate (→ video).
Everything a job needs is decided here and frozen into its spec, so a job runs the same
after a restart. Validation happens here too: a drop that cannot be planned is rejected
with a reason before anything runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from dropkiln.config import Settings
from dropkiln.daemon import limits
from dropkiln.stages import StageError, StageSpec, get_stage
from dropkiln.stages.dataset import DatasetOptions
from dropkiln.store import EventStore, list_jobs
from dropkiln.store.events import JobSubmitted
from dropkiln.store.vocabulary import DropKind, JobState, Lane

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
    from dropkiln.stages.dataset import extract_zip_safely, load_dataset_options

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
    from dropkiln.stages.generation.prompt_file import load_prompt_file

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
    import dropkiln.stages.generate
    import dropkiln.stages.generation.prompt_file
    import dropkiln.stages.train
    import dropkiln.stages.video  # noqa: F401


class Planner:
    """Turns parsed drops into JobSubmitted events."""

    def __init__(self, settings: Settings, store: EventStore) -> None:
        self.settings = settings
        self.store = store
        load_drop_modules()

    async def plan(self, drop: ParsedDrop, drop_id: str) -> list[JobSubmitted]:
        if isinstance(drop.options, DatasetOptions):
            return self._plan_dataset(drop, drop.options, drop_id)
        return await self._plan_prompts(drop, drop.options, drop_id)

    def _job(
        self,
        stage: str,
        name: str,
        spec: StageSpec,
        drop_id: str,
        depends_on: list[str] | None = None,
        rung_key: str | None = None,
        lane: str | None = None,
        device_class: str | None = None,
    ) -> JobSubmitted:
        definition = get_stage(stage)
        lane = lane or definition.lane
        if not isinstance(spec, definition.spec):
            raise TypeError(f"a {stage} job takes a {definition.spec.__name__}")
        return JobSubmitted(
            job_id=new_id(),
            stage=stage,
            name=name,
            lane=lane,
            priority=definition.priority,
            spec=spec.model_dump(mode="json"),
            depends_on=depends_on or [],
            drop_id=drop_id,
            rung_key=rung_key,
            # A pin is about the GPU: CPU-lane work (bucketing, encoding) runs anywhere.
            device_class=device_class if Lane(lane) == Lane.GPU else None,
        )

    def _plan_dataset(
        self, drop: ParsedDrop, options: DatasetOptions, drop_id: str
    ) -> list[JobSubmitted]:
        """bucket (CPU) → cache (GPU) → train (GPU), each reading the one before."""
        from dropkiln.stages.bucket import BucketSpec
        from dropkiln.stages.cache import CacheSpec
        from dropkiln.stages.train import TrainSpec

        model, vae, train = options.model, options.vae, options.train
        check_model(model)
        check_vae(vae)
        resolution = options.bucket.resolution
        bucket = self._job(
            "bucket",
            drop.name,
            BucketSpec(
                dataset_dir=str(drop.folder),
                name=drop.name,
                bucket=options.bucket,
                seed=train.seed,
            ),
            drop_id,
        )
        cache = self._job(
            "cache",
            drop.name,
            CacheSpec(name=drop.name, model=model, vae=vae, flip_augment=train.flip_augment),
            drop_id,
            depends_on=[bucket.job_id],
            rung_key=f"cache:{model}:{resolution}",
            device_class=options.device_class,
        )
        train_job = self._job(
            "train",
            drop.name,
            TrainSpec(
                name=drop.name,
                model=model,
                vae=vae,
                options=train,
                output_dir=str(self.settings.paths.loras / drop.name),
            ),
            drop_id,
            depends_on=[cache.job_id],
            rung_key=f"train:{model}:{resolution}",
            device_class=options.device_class,
        )
        return [bucket, cache, train_job]

    async def _plan_prompts(
        self, drop: ParsedDrop, options: PromptDrop, drop_id: str
    ) -> list[JobSubmitted]:
        """generate (GPU) → video (when asked); LoRAs still training become dependencies."""
        from dropkiln.stages.generate import GenerateSpec, LoraFile
        from dropkiln.stages.video import VideoSpec, video_path

        prompt_file = options.prompt_file
        model = prompt_file.model or self.settings.model
        vae = self.settings.vae if prompt_file.vae is None else prompt_file.vae
        check_model(model)
        check_vae(vae)
        loras: list[LoraFile] = []
        depends_on: list[str] = []
        for ref in prompt_file.loras:
            path, job_id = await self._resolve_lora(ref.name)
            loras.append(LoraFile(name=ref.name, path=str(path), weight=ref.weight))
            if job_id is not None and job_id not in depends_on:
                depends_on.append(job_id)
        stem = await self._output_stem(drop.name, drop_id)
        rebased = _rebase_controls(prompt_file, drop.folder, options.source)
        largest = max(prompt_file.images, key=lambda image: image.width * image.height)
        generate = self._job(
            "generate",
            stem,
            GenerateSpec(
                name=stem,
                model=model,
                vae=vae,
                prompt_file=rebased,
                loras=loras,
                output_dir=str(self.settings.paths.images / stem),
                preview_every=self.settings.generate.preview_every,
            ),
            drop_id,
            depends_on=depends_on,
            rung_key=f"generate:{model}:{largest.width}x{largest.height}",
            device_class=prompt_file.device_class,
        )
        jobs = [generate]
        if rebased.video is not None:
            output = video_path(self.settings.paths.videos, stem, rebased.video)
            jobs.append(
                self._job(
                    "video",
                    stem,
                    VideoSpec(name=stem, options=rebased.video, output=str(output)),
                    drop_id,
                    depends_on=[generate.job_id],
                    device_class=prompt_file.device_class,
                )
            )
        return jobs

    async def _resolve_lora(self, ref: str) -> tuple[Path, str | None]:
        """(LoRA file, train job to wait for) for a dataset name, a job id or a path."""
        from dropkiln.stages.train import lora_path

        looks_like_path = "/" in ref or ref.endswith(".safetensors")
        if looks_like_path:
            path = Path(ref).expanduser()
            if not path.is_file() or path.suffix != ".safetensors":
                raise DropRejection(f"LoRA {ref!r}: no such .safetensors file")
            return path.resolve(), None
        for job in await list_jobs(self.store):
            if job.stage != "train" or job.state in (JobState.FAILED, JobState.CANCELLED):
                continue
            if job.name == ref or job.id == ref:
                path = lora_path(job.spec["output_dir"], job.name)
                return path, None if job.state == JobState.SUCCEEDED else job.id
        existing = lora_path(self.settings.paths.loras / ref, ref)
        if existing.is_file():
            return existing, None
        raise DropRejection(
            f"LoRA {ref!r} does not exist: no dataset, train job or file by that name "
            "(drop the dataset first, or give a path to a .safetensors file)"
        )

    async def _output_stem(self, name: str, drop_id: str) -> str:
        """The prompt file's name, unless an earlier drop already used that output folder."""
        taken = (self.settings.paths.images / name).exists() or any(
            job.stage == "generate" and job.name == name for job in await list_jobs(self.store)
        )
        return f"{name}-{drop_id}" if taken else name


async def check_drop(settings: Settings, store: EventStore, entry: Path, kind: str) -> ParsedDrop:
    """Everything the daemon decides about a drop before taking it, without taking it.

    The same reading, safe extraction (into a scratch folder removed again) and planning as
    ``Ingestor.ingest``, so `dropkiln serve` refuses exactly what the daemon would reject,
    with the same reason; nothing is written to the store.
    """
    scratch_id = f"check-{new_id()}"
    try:
        parsed = await anyio.to_thread.run_sync(parse_drop, settings, entry, kind, scratch_id)
        await Planner(settings, store).plan(parsed, scratch_id)
        return parsed
    finally:
        await anyio.to_thread.run_sync(
            functools.partial(
                shutil.rmtree, settings.paths.work / "drops" / scratch_id, ignore_errors=True
            )
        )


def _rebase_controls(prompt_file: PromptFile, folder: Path, source: Path) -> PromptFile:
    """Control, reference, init and mask images were checked in drop/prompts/ (``source``);
    the job reads them from processed/ (``folder``)."""

    def moved(path: str) -> str:
        if source.is_file():
            raise DropRejection(
                "control, reference, init and mask images need the prompt file and its images "
                "dropped together as one folder"
            )
        return str(folder / Path(path).relative_to(source.resolve()))

    images = []
    for image in prompt_file.images:
        update: dict[str, Any] = {}
        if image.control is not None:
            update["control"] = [
                control.model_copy(update={"image": moved(control.image)})
                for control in image.control
            ]
        if image.reference is not None:
            update["reference"] = [
                reference.model_copy(update={"image": moved(reference.image)})
                for reference in image.reference
            ]
        for field_name in ("init_image", "mask"):
            if getattr(image, field_name) is not None:
                update[field_name] = moved(getattr(image, field_name))
        images.append(image.model_copy(update=update) if update else image)
    video = prompt_file.video
    if video is not None and video.audio is not None:
        video = video.model_copy(update={"audio": moved(video.audio)})
    return prompt_file.model_copy(update={"images": images, "video": video})


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
