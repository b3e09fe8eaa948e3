"""The LoRA files of a run: one per checkpoint (NAME-step000500.safetensors) and the final.

Every file is a complete kohya LoRA with the run's metadata at that step (``ss_steps``,
``ss_epoch``), so a person can load any step in kohya, ComfyUI or A1111 and keep the one
that is not yet overfit, as kohya's ``--save_every_n_steps`` lets them.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropkiln.options import TrainSettings
from dropkiln.stages.models import ModelRef, checkpoint_hashes
from dropkiln.stages.training.captions import tag_frequency
from dropkiln.stages.training.lora_export import write_kohya
from dropkiln.stages.training.session import TrainingSession

STEP_FILE = re.compile(r"-step(\d{6,})\.safetensors$")


def step_lora_path(output_dir: Path | str, name: str, step: int) -> Path:
    """Where the LoRA of checkpoint ``step`` is written (beside that step's validation images)."""
    return Path(output_dir) / f"{name}-step{step:06d}.safetensors"


def step_loras(output_dir: Path | str, name: str) -> list[tuple[int, Path]]:
    """The per-checkpoint LoRA files on disk, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"{glob_escape(name)}-step*.safetensors"):
        match = STEP_FILE.search(path.name)
        if match and path.name == step_lora_path(folder, name, int(match[1])).name:
            found.append((int(match[1]), path))
    return sorted(found)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


@dataclass(frozen=True)
class LoraExports:
    """What every LoRA file of one run says about the run; writes each step's file."""

    name: str
    output_dir: Path
    ref: ModelRef
    """The model trained on."""
    options: TrainSettings
    images: list[tuple[tuple[int, int], tuple[int, int]]]
    """(bucket, original size) per cached image, for kohya's bucket_info."""
    captions: list[str]
    resolution: tuple[int, int]
    batches_per_epoch: int
    mixed_precision: str
    gradient_checkpointing: bool

    def facts(self, session: TrainingSession, steps: int) -> dict[str, Any]:
        """The facts kohya_metadata turns into ``ss_*`` keys, for the LoRA at ``steps``."""
        options, per_epoch = self.options, self.batches_per_epoch
        finished = datetime.datetime.now(datetime.UTC)
        # kohya draws a random session id per run; ours is the job's (name, options, model),
        # so a resumed or retried run writes the same file as an undisturbed one
        job = f"{self.name}\0{options.model_dump_json()}\0{self.ref.fingerprint}"
        session_digest = hashlib.sha256(job.encode())
        return {
            "name": self.name,
            "kind": self.ref.kind,
            "model_name": Path(self.ref.name).name,
            "model_hashes": checkpoint_hashes(self.ref),
            "session_id": int(session_digest.hexdigest()[:8], 16),
            "images": self.images,
            "batches_per_epoch": per_epoch,
            "epoch": -(-steps * options.gradient_accumulation // per_epoch),
            "num_epochs": -(-options.steps * options.gradient_accumulation // per_epoch),
            "resolution": self.resolution,
            "options": options,
            "alpha": session.models.alpha,
            "steps": steps,
            "num_images": len(self.captions),
            "tag_frequency": tag_frequency(self.captions),
            "mixed_precision": self.mixed_precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "started_at": session.started_at,
            "finished_at": finished.timestamp(),
            "finished_date": finished.date().isoformat(),
        }

    def write(self, path: Path, session: TrainingSession, steps: int) -> Path:
        return write_kohya(path, session.models, self.facts(session, steps))

    def write_step(self, session: TrainingSession, step: int) -> Path:
        """The LoRA of checkpoint ``step``, written atomically (the caller swaps in EMA)."""
        return self.write(step_lora_path(self.output_dir, self.name, step), session, step)

    def prune(self, keep: int | None) -> list[Path]:
        """Remove all but the newest ``keep`` step files (None keeps all); the removed."""
        if keep is None:
            return []
        removed = []
        for _, path in step_loras(self.output_dir, self.name)[:-keep]:
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed
