"""The generate stage: a validated prompt file → PNGs with their parameters, a contact sheet,
and, for a latent-walk video, the walk's frames (they need the model, so they are made here
on the GPU lane; the video stage only encodes).

Resumable per image: every image is written atomically with a digest of what it depicts in
its ``dropkiln`` chunk, and an image whose file already carries the right digest is never
rendered again, whether after an OOM retry, a preemption or a kill.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from dropkiln.stages.base import StageContext, StageDef, StageError, StageSpec
from dropkiln.stages.generation.memory_ladder import GENERATE_LADDER, batch_limit
from dropkiln.stages.generation.prompt_file import PromptFile, expand_jobs
from dropkiln.stages.starting_rung import generation_start_rung

if TYPE_CHECKING:
    from dropkiln.stages.starting_rung import StartFacts

CONTACT_SHEET = "contact-sheet.png"
PREVIEW = "preview.png"
WALK_FOLDER = "walk"


class LoraFile(BaseModel):
    """A LoRA the planner resolved: its file, the weight asked for, and the name used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: str
    weight: float = 1.0


class GenerateSpec(StageSpec):
    """Render one prompt file."""

    name: str
    """The output stem: images go to ``output_dir`` (ROOT/outputs/images/STEM)."""
    model: str
    vae: str = ""
    """A standalone VAE file in place of the model's own ("": none)."""
    prompt_file: PromptFile
    """The validated prompt file (control image paths absolute)."""
    loras: list[LoraFile] = Field(default_factory=list)
    output_dir: str
    preview_every: int = Field(0, ge=0)
    """Write a latent preview every N denoising steps (0: never)."""


def resolution(spec: GenerateSpec) -> str:
    """The job's largest image size, ``WxH``: with the model, what its memory rung depends on."""
    largest = max(spec.prompt_file.images, key=lambda image: image.width * image.height)
    return f"{largest.width}x{largest.height}"


def run_generate(spec: GenerateSpec, ctx: StageContext) -> dict[str, Any]:
    """Render every image not already on disk, then the walk frames and the contact sheet."""
    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.generation.run import GenerationRun
    from dropkiln.stages.models import resolve_model, shared_pipelines

    tasks = expand_jobs(spec.prompt_file)
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(spec.model, ctx.root / "state" / "models", vae=spec.vae)
    for lora in spec.loras:
        if not Path(lora.path).is_file():
            raise StageError(f"LoRA {lora.name}: file {lora.path} is missing")
    rung = STAGE.rung(ctx.memory_rung)
    pipe = shared_pipelines().get(model, ctx.device, inference_dtype(ctx.device))
    run = GenerationRun(spec, ctx, model, rung, tasks, output_dir)
    with run.prepared(pipe):
        images = run.render_images()
        walk_frames = run.render_walk()
        sheet = run.contact_sheet(images, output_dir / CONTACT_SHEET)
    ctx.artifact(sheet, "contact-sheet")
    first = tasks[0]
    return {
        "name": spec.name,
        "output_dir": str(output_dir),
        "images": [str(path) for path in images],
        "contact_sheet": str(sheet),
        "walk_frames": [str(path) for path in walk_frames],
        "video": spec.prompt_file.video.model_dump() if spec.prompt_file.video else None,
        "model": {"name": model.name, "kind": model.kind, "fingerprint": model.fingerprint},
        "loras": run.lora_records,
        "memory_rung": rung.name,
        "width": first.width,
        "height": first.height,
        "rendered": run.rendered,
        "skipped": run.skipped,
        # inside diffusers' calls, this attempt: the job's other time is dropkiln's own
        "pipeline_seconds": round(run.in_pipeline.seconds, 4),
        "pipeline_cpu_seconds": round(run.in_pipeline.cpu_seconds, 4),  # the device thread's
    }


def estimated_start_rung(spec: GenerateSpec, facts: StartFacts) -> int | None:
    """The first rung the job's largest image is estimated to fit at its batch size (None
    without a known family, as for training)."""
    family = facts.family(spec.model)
    if family is None:
        return None
    images = spec.prompt_file.images
    largest = max(images, key=lambda image: image.width * image.height)
    asked = max((image.batch_size or 0 for image in images), default=0) or None
    return generation_start_rung(
        STAGE.ladder,
        family,
        largest.width,
        largest.height,
        lambda rung: batch_limit(asked, rung, "cuda"),
        facts.available,
    )


STAGE = StageDef(
    "generate",
    "gpu",
    GenerateSpec,
    run_generate,
    GENERATE_LADDER,
    priority=10,
    start_rung=estimated_start_rung,
    inputs=("lora",),
)
