"""A clean baseline: plain diffusers in a fresh process that shares nothing with dropkiln.

The process imports diffusers and torch only (no dropkiln module), loads the model once,
then renders what it is asked for on stdin, one JSON request a line, and answers each
with the seconds it took from the request to the last PNG saved. Its torch runs with the
defaults a user's own script would get (threads included), on its main thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SERVER = r"""
import json, sys, time
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
folder, threads = sys.argv[1], int(sys.argv[2])
if threads > 0:
    torch.set_num_threads(threads)
pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    started = time.perf_counter()
    images, batch = request["images"], request.get("batch", 1)
    for first in range(0, len(images), batch):
        group = images[first:first + batch]  # one call, one generator per image
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pictures = pipe(prompt=[image["prompt"] for image in group],
                        num_inference_steps=group[0]["steps"],
                        guidance_scale=group[0]["guidance"], width=group[0]["width"],
                        height=group[0]["height"],
                        generator=[torch.Generator().manual_seed(image["seed"])
                                   for image in group]).images
        for number, picture in enumerate(pictures, start=first):
            picture.save(f"{request['out']}/{number:03d}.png")
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
"""


class CleanProcess:
    """A baseline script in a fresh process of its own, kept warm between requests: it says
    its torch thread count once, then answers each JSON request line with one JSON line."""

    def __init__(self, script: str, model_folder: Path, threads: int = 0) -> None:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        environment.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, str(model_folder), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
        )
        self.threads = int(self._answer()["threads"])

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the clean baseline process exited ({self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class CleanDiffusers(CleanProcess):
    """Plain diffusers rendering, kept warm between requests like the daemon's model."""

    def __init__(self, model_folder: Path, threads: int = 0) -> None:
        super().__init__(SERVER, model_folder, threads)

    def render(self, images: list[dict[str, Any]], out: Path, batch: int = 1) -> float:
        """Seconds from the request to the last PNG saved in ``out``; ``batch`` images of the
        same settings per pipeline call, each from its own seed."""
        out.mkdir(parents=True, exist_ok=True)
        request = {"images": images, "out": str(out), "batch": batch}
        return float(self.ask(request)["seconds"])
