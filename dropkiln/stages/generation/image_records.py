"""The ``dropkiln`` record of each image and walk frame: what it depicts, digested.

A kept PNG whose record carries the same digest is finished work: a resumed job skips it,
and an edited prompt file re-renders only the images whose settings changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkiln.stages.generation.controlnet import control_record, image_digest
from dropkiln.stages.generation.latent_walk import WalkFrame
from dropkiln.stages.generation.prompt_file import ImageTask

if TYPE_CHECKING:
    from dropkiln.stages.base import MemoryRung
    from dropkiln.stages.models import ModelRef

RECORD_VERSION = 1


class ImageRecords:
    """Records for one job's images: its model, LoRAs and memory rung, and each image's task."""

    def __init__(
        self, model: ModelRef, rung: MemoryRung, loras: list[dict[str, Any]],
        tasks: list[ImageTask],
    ) -> None:  # fmt: skip
        self.model, self.rung, self.loras, self.tasks = model, rung, loras, tasks

    def image_record(self, task: ImageTask) -> dict[str, Any]:
        """What the image depicts (digested), and how it was made."""
        # the batch size says how an image was rendered, not what it shows
        unused = {"batch_size"} | (set() if task.init_image else {"init_image", "strength", "mask"})
        if task.reference is None:
            unused.add("reference")  # records from before references keep their digests
        image = task.model_dump(mode="json", exclude=unused)
        if task.control is not None:
            controls = [control_record(control) for control in task.control]
            # one ControlNet is recorded as before there could be several: same digest
            image["control"] = controls[0] if len(controls) == 1 else controls
        if task.reference is not None:
            image["reference"] = [
                {**reference, "image": Path(reference["image"]).name,
                 "sha256": image_digest(reference["image"])}
                for reference in image["reference"]
            ]  # fmt: skip
        for field in ("init_image", "mask"):
            if image.get(field):
                source = Path(image[field])
                image[field] = {"image": source.name, "sha256": image_digest(source)}
        content = {"image": image, "model": self._model_record(), "loras": self.loras}
        return self._sealed(content)

    def walk_record(self, frame: WalkFrame) -> dict[str, Any]:
        """A latent-walk frame: its two keyframes' digests, the mix, the lead settings."""
        lead = self.tasks[0]
        content = {
            "walk": {"frame": frame.index, "first": frame.first, "second": frame.second,
                     "mix": frame.mix},
            "keyframes": [self.image_record(self.tasks[i])["digest"]
                          for i in (frame.first, frame.second)],
            "lead": lead.model_dump(mode="json", include={"steps", "guidance", "scheduler",
                                                          "width", "height", "seed"}),
        }  # fmt: skip
        return self._sealed(content)

    def _sealed(self, content: dict[str, Any]) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return {
            "version": RECORD_VERSION,
            **content,
            "digest": digest,
            "model_name": self.model.name,
            "memory_rung": self.rung.name,
        }

    def _model_record(self) -> dict[str, str]:
        # the weights, not the name or path they were found under, decide what an image shows
        return {"kind": self.model.kind, "fingerprint": self.model.fingerprint}
