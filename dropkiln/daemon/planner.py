"""From a settled drop to the jobs that turn it into outputs.

A dataset becomes bucket → cache → train; a prompt file becomes generate (→ video).
Everything a job needs is decided here and frozen into its spec, so a job runs the same
after a restart. Validation happens here too: a drop that cannot be planned is rejected
with a reason before anything runs.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from dropkiln.config import Settings
from dropkiln.daemon.drops import (
    DropRejection,
    ParsedDrop,
    PromptDrop,
    check_model,
    check_vae,
    load_drop_modules,
    new_id,
    parse_drop,
)
from dropkiln.stages import StageSpec, get_stage
from dropkiln.stages.dataset import DatasetOptions
from dropkiln.store import EventStore, list_jobs
from dropkiln.store.events import JobSubmitted
from dropkiln.store.vocabulary import JobState, Lane

if TYPE_CHECKING:
    from dropkiln.stages.generation.prompt_file import PromptFile


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
