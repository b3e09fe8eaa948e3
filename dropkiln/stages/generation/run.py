"""One run of the generate stage: the pipeline set up for the job, then image after image."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.base import (
    Artifact,
    MemoryRung,
    StageContext,
    StageStopped,
)
from dropkiln.stages.generation.batch_records import BatchRecords
from dropkiln.stages.generation.controlnet import (
    control_inputs,
    control_pipeline,
    controlnet_folder,
    load_controlnet,
)
from dropkiln.stages.generation.image_records import ImageRecords
from dropkiln.stages.generation.img2img import image_mode, init_inputs, init_pipeline
from dropkiln.stages.generation.latent_walk import WalkFrame, lerp_embeddings, slerp, walk_plan
from dropkiln.stages.generation.lora_loading import load_loras
from dropkiln.stages.generation.memory_ladder import (
    apply_rung,
    batch_limit,
    moves_weights,
    undo_rung,
)
from dropkiln.stages.generation.png_files import (
    a1111_parameters,
    contact_sheet,
    latent_preview,
    model_label,
    png_info,
    read_dropkiln_record,
    write_png,
)
from dropkiln.stages.generation.png_writer import PngWriter
from dropkiln.stages.generation.prompt_file import ImageTask
from dropkiln.stages.generation.references import (
    adapter_file,
    attach_references,
    detach_references,
    reference_inputs,
)
from dropkiln.stages.generation.render import (
    PipelineCalls,
    StepCallback,
    batch_key,
    inference_dtype,
    initial_noise,
    prompt_embeddings,
    render_batch,
    render_from_embeddings,
)
from dropkiln.stages.generation.schedulers import make_scheduler
from dropkiln.stages.models.hashes import checkpoint_hashes
from dropkiln.stages.models.refs import safetensors_data_sha256

if TYPE_CHECKING:
    from PIL import Image

    from dropkiln.stages.generate import GenerateSpec
    from dropkiln.stages.models import ModelRef


class GenerationRun:
    """Renders a job's images and walk frames on one warm pipeline, skipping finished ones."""

    def __init__(
        self,
        spec: GenerateSpec,
        ctx: StageContext,
        model: ModelRef,
        rung: MemoryRung,
        tasks: list[ImageTask],
        output_dir: Path,
    ) -> None:
        self.spec, self.ctx, self.model, self.rung = spec, ctx, model, rung
        self.tasks, self.output_dir = tasks, output_dir
        self.dtype = inference_dtype(ctx.device)
        self.lora_records = [
            {"name": lo.name, "weight": lo.weight, "sha256": safetensors_data_sha256(Path(lo.path))}
            for lo in spec.loras
        ]
        self.records = ImageRecords(model, rung, self.lora_records, tasks)
        video = spec.prompt_file.video
        self.walk: list[WalkFrame] = []
        if video is not None and video.kind == "latent-walk":
            self.walk = walk_plan(len(tasks), video.frames, video.loop)
        self.total_steps = sum(t.steps for t in tasks) + len(self.walk) * tasks[0].steps
        self.done_steps = 0
        self.rendered = 0
        self.skipped = 0
        self._base: Any = None
        self._base_scheduler_config: Any = None
        self._active: tuple[str | None, Any] | None = None
        self._stopping = False
        self._keyframes: dict[int, tuple[dict[str, Any], Any]] = {}
        self._schedulers: dict[str, Any] = {}
        self._writer = PngWriter()
        self._records = BatchRecords()
        """Each batch's checkpoint, committed while the next batch denoises."""
        self._written: list[Artifact] = []
        """Images written and not yet recorded: recorded with their batch's checkpoint."""
        self.in_pipeline = PipelineCalls()  # the rest of a job's time is dropkiln's own
        self._checkpoint_sha256 = checkpoint_hashes(model).sha256  # the infotext's, once a job

    @contextmanager
    def prepared(self, pipe: Any) -> Iterator[None]:
        """LoRAs loaded for the job; afterwards the warm pipeline is as it was."""
        from dropkiln.stages.fault_hooks import inside, middle_block

        original_scheduler = pipe.scheduler
        self._base, self._base_scheduler_config = pipe, original_scheduler.config
        # every pipeline of the job (ControlNet, img2img) shares the base's VAE and the rung
        self.in_pipeline.inference = not moves_weights(pipe, self.rung.options)
        try:
            load_loras(pipe, self.spec.loras, self.model.name)
            with inside(middle_block(pipe.vae.decoder), self._in_decode):
                yield
        finally:
            # after an error too, what is on disk is recorded (and its batch checkpointed)
            self._writer.settle_quietly()
            self._writer.close()
            self._records.close()
            self._record_written()
            self._deactivate()
            pipe.scheduler = original_scheduler
            if self.spec.loras:
                pipe.unload_lora_weights()

    def render_images(self) -> list[Path]:
        """Every image of the prompt file, in order; finished ones are kept, not redone.

        Neighbours with the same settings share a call of up to the batch size. The batches
        are planned over all images, finished or not: on the CPU a matrix product's rounding
        depends on how many rows it has, so an image is bit-for-bit reproducible only within
        the same batch. A batch with any image missing is rendered whole again and only the
        missing images are written.
        """
        paths = [self.output_dir / f"{task.stem}.png" for task in self.tasks]
        records = [self.records.image_record(task) for task in self.tasks]
        for batch in self._batches():
            missing = [p for p in batch if not _finished(paths[p], records[p]["digest"])]
            for position in batch:
                if position not in missing:
                    # recorded again from the file: a kill may have come before its record
                    self._records.wait()
                    self.ctx.artifact(paths[position], "image")
                    self._skip(self.tasks[position].steps)
            if not missing:
                continue
            first, last = missing[0], missing[-1]
            self._stop_point("images", first)
            tasks = [self.tasks[position] for position in batch]
            lead = tasks[0]
            pipe = self._pipeline_for(lead)
            self._use_scheduler(pipe, lead.scheduler)
            inputs: dict[str, object] = dict(init_inputs(lead))
            if lead.control is not None:
                inputs.update(control_inputs(lead.control, f"image[{lead.entry}]"))
            if lead.reference is not None:
                inputs.update(reference_inputs(pipe, lead.reference, f"image[{lead.entry}]"))
            on_step_end = self._on_step_end("image", self.tasks[first].index, len(missing))
            with self.in_pipeline:
                images = render_batch(pipe, tasks, on_step_end, inputs)
            self._writer.settle()  # the batch before was written while this one denoised
            if self._stopping:
                self._stop_now("images", first)
            for position, task, image in zip(batch, tasks, images, strict=True):
                if position not in missing:
                    continue
                parameters = a1111_parameters(
                    task,
                    self._model_label(),
                    self._checkpoint_sha256,
                    self.lora_records,
                )
                self.ctx.fault("generate.image")
                info = png_info(parameters, records[position])
                self._writer.submit(image, paths[position], info, self._image_written)
            checkpoint = {"phase": "images", "done": last + 1, "last": paths[last].name}
            self._writer.then(partial(self._checkpoint_batch, checkpoint))
        # the last batch's writes are settled by the walk or the contact sheet; until then
        # this thread writes the ones the writer thread has not started
        self._writer.help()
        return paths

    def _image_written(self, target: Path, sha256: str) -> None:
        self.ctx.fault("generate.written")
        self.rendered += 1
        self._written.append(Artifact(target, "image", sha256))

    def _checkpoint_batch(self, checkpoint: dict[str, Any]) -> None:
        """The batch's checkpoint and its images' records: one durable write per batch, made
        while the next batch denoises (``batch_records.py``)."""
        written, self._written = self._written, []
        self._records.submit(self.ctx.checkpoint, checkpoint, written)

    def _record_written(self) -> None:
        """Images written before an error, recorded without their batch's checkpoint."""
        written, self._written = self._written, []
        for artifact in written:
            self.ctx.artifact(*artifact)

    def contact_sheet(self, images: list[Path], target: Path) -> Path:
        """The contact sheet of ``images``, drawn from the thumbnails the writes made (a kept
        image is read) and written on the writer thread while this one records the images."""
        if self._writer.failed():
            self._writer.settle()  # raises the write's error, the written ones recorded
        pictures = [self._writer.thumbnail(path) or path for path in images]
        labels = [task.stem for task in self.tasks]
        sheet = self._writer.after_writes(partial(contact_sheet, pictures, labels, target))
        self._writer.settle()
        self._records.wait()  # the last batch's checkpoint, committed while the sheet was made
        return sheet.result()

    def _batches(self) -> Iterator[list[int]]:
        """Runs of images that can share a call, each at most the rung's batch size."""
        batch: list[int] = []
        for position in range(len(self.tasks)):
            task = self.tasks[position]
            if batch:
                lead = self.tasks[batch[0]]
                limit = batch_limit(lead.batch_size, self.rung, self.ctx.device)
                if len(batch) >= limit or batch_key(task) != batch_key(lead):
                    yield batch
                    batch = []
            batch.append(position)
        if batch:
            yield batch

    def render_walk(self) -> list[Path]:
        """The latent-walk frames (none unless the prompt file asks for a latent walk)."""
        paths: list[Path] = []
        if not self.walk:
            return paths
        self._writer.settle()  # the images are recorded before the first frame
        lead = self.tasks[0]
        for frame in self.walk:
            target = self.output_dir / "walk" / f"{frame.index:04d}.png"
            paths.append(target)
            record = self.records.walk_record(frame)
            if _finished(target, record["digest"]):
                self._skip(lead.steps)
                continue
            self._stop_point("walk", frame.index)
            pipe = self._pipeline_for(lead)
            self._use_scheduler(pipe, lead.scheduler)
            first_embeds, first_noise = self._keyframe(pipe, frame.first)
            second_embeds, second_noise = self._keyframe(pipe, frame.second)
            with self.in_pipeline:
                image = render_from_embeddings(
                    pipe,
                    lead,
                    lerp_embeddings(first_embeds, second_embeds, frame.mix),
                    slerp(first_noise, second_noise, frame.mix),
                    self._on_step_end("frame", frame.index),
                )
            if self._stopping:
                self._stop_now("walk", frame.index)
            parameters = f"latent walk frame {frame.index}: {frame.mix:.3f} from {frame.first}"
            self._write_frame(image, target, record, parameters)
            self._records.wait()
            self.ctx.checkpoint({"phase": "walk", "done": frame.index + 1, "last": target.name})
        return paths

    def _model_label(self) -> str:
        return model_label(self.model.name)

    def _write_frame(
        self, image: Image.Image, target: Path, record: dict[str, Any], parameters: str
    ) -> None:
        self.ctx.fault("generate.image")
        write_png(image, target, png_info(parameters, record))
        self.ctx.fault("generate.written")
        self.rendered += 1

    def _skip(self, steps: int) -> None:
        self.skipped += 1
        self.done_steps += steps
        self.ctx.progress(min(self.done_steps, self.total_steps), self.total_steps)

    def _stop_point(self, phase: str, done: int) -> None:
        if self.ctx.should_stop():
            self._writer.settle()
            self._records.wait()
            self.ctx.checkpoint({"phase": phase, "done": done})
            raise StageStopped(f"generate {self.spec.name} stopped before {phase} {done}")

    def _stop_now(self, phase: str, done: int) -> None:
        """Stopped mid-image: the image is dropped, the job resumes before it."""
        self._records.wait()
        self.ctx.checkpoint({"phase": phase, "done": done})
        raise StageStopped(f"generate {self.spec.name} stopped while denoising {phase} {done}")

    def _on_step_end(self, label: str, index: int, images: int = 1) -> StepCallback:
        preview_every = self.spec.preview_every

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            self.ctx.fault("generate.step")
            self.done_steps += images
            done = min(self.done_steps, self.total_steps)
            self.ctx.progress(done, self.total_steps, **{label: index}, step=step + 1)
            if preview_every and (step + 1) % preview_every == 0:
                self._write_preview(pipe, tensors["latents"])
            if self.ctx.should_stop():
                # the pipeline skips its remaining steps; the image is then thrown away
                pipe._interrupt = True
                self._stopping = True
            return {}

        return on_step_end

    def _in_decode(self) -> None:
        # inside the VAE decode, half-way through its decoder: where a decode runs out of memory
        self.ctx.fault("generate.decode")

    def _write_preview(self, pipe: Any, latents: Any) -> None:
        target = self.output_dir / "preview.png"
        write_png(latent_preview(latents, "XL" in type(pipe).__name__), target, compress_level=1)
        self._records.wait()
        self.ctx.artifact(target, "preview")

    def _pipeline_for(self, task: ImageTask) -> Any:
        """The base, ControlNet, img2img or inpainting pipeline for ``task``, with the memory
        rung applied."""
        mode = image_mode(task)
        models = [control.model for control in task.control or []]
        key = "control:" + "+".join(models) if models else mode
        references = task.reference or []
        if references:
            key = f"{key}|reference:{references[0].adapter}x{len(references)}"
        if self._active is not None and self._active[0] == key:
            return self._active[1]
        self._deactivate()
        pipeline = self._base
        if models:
            models_dir = self.ctx.root / "state" / "models"
            controlnets = [
                load_controlnet(
                    controlnet_folder(name, self.model, models_dir), self.ctx.device, self.dtype
                )
                for name in models
            ]
            pipeline = control_pipeline(self._base, controlnets)
        elif mode is not None:
            pipeline = init_pipeline(self._base, mode)
        if references:
            models_dir = self.ctx.root / "state" / "models"
            adapter = adapter_file(references[0].adapter, self.model, models_dir)
            attach_references(pipeline, adapter, len(references), self.ctx.device, self.dtype)
        self._active = (key, pipeline)
        apply_rung(pipeline, self.rung.options, self.ctx.device)
        return pipeline

    def _deactivate(self) -> None:
        if self._active is not None:
            key, pipeline = self._active
            self._active = None
            undo_rung(pipeline, self.rung.options, self.ctx.device)
            if key is not None and "|reference:" in key:
                detach_references(pipeline)

    def _use_scheduler(self, pipe: Any, name: str) -> None:
        # one per name and job: every pipeline call starts with set_timesteps, which resets
        # a scheduler's state, so reusing it is what diffusers itself does between calls
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self._base_scheduler_config)
        pipe.scheduler = self._schedulers[name]

    def _keyframe(self, pipe: Any, index: int) -> tuple[dict[str, Any], Any]:
        if index not in self._keyframes:
            # the keyframe's own prompt and seed, the walk's guidance (it decides on CFG)
            task = self.tasks[index].model_copy(update={"guidance": self.tasks[0].guidance})
            with self.in_pipeline:
                noise = initial_noise(pipe, task, self.dtype)
                self._keyframes[index] = (prompt_embeddings(pipe, task), noise)
        return self._keyframes[index]


def _finished(target: Path, digest: str) -> bool:
    """True when ``target`` is a complete image of exactly this content (atomic writes)."""
    if not target.is_file():
        return False
    record = read_dropkiln_record(target)
    return record is not None and record.get("digest") == digest
