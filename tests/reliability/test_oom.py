"""Out of memory at every named fault point of every GPU stage, through the real daemon.

An OOM that fires once moves the job exactly one rung down its ladder (OutOfMemory, then
RetryScheduled to the next rung), it resumes and succeeds; the outputs are then compared
with the undisturbed run's for what the rungs leave unchanged. An OOM that fires at every
rung fails the job with a reason naming every rung tried.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dropkiln.stages import get_stage
from dropkiln.stages.generation.memory_ladder import GENERATE_LADDER
from tests.reliability.conftest import Reference
from tests.reliability.faultpoints import fault_points
from tests.reliability.home import Home
from tests.reliability.pipeline import (
    PROMPTS,
    Outputs,
    PromptDropper,
    collect_outputs,
    drop_dataset,
    finish,
    png_pixels,
)

pytestmark = pytest.mark.slow

GPU_STAGES = ("cache", "train", "generate")
ONCE = (
    "oom@cache.batch:1",
    "oom-cudnn-alloc@cache.encode:2",
    "oom-cpu@train.forward:3",
    "oom@train.step:3",
    "oom-cublas@train.backward:6",
    "oom@train.checkpoint:3",
    "oom@generate.step:2",
    "oom-cuda-error@generate.decode:3",
    "oom-python@generate.image:3",
)
"""Each fires once. Hits count per process, so after a retry the next point of the same
stage fires on a later image or step, one rung further down. The points inside a forward,
a backward and a VAE decode raise the other forms a real allocation failure takes (the
class and wording cuDNN, the CPU allocator, cuBLAS, CUDA and Python use)."""

PLAIN_PROMPT = """\
[defaults]
steps = 3
width = 64
height = 64
seed = 7

[[image]]
prompt = "a red circle"
count = 2

[video]
kind = "slideshow"
fps = 4
seconds_per_image = 1.0
"""
"""Without a LoRA, so the generate job does not wait for a train job that an OOM fails."""


GENERATE_RUNGS = {rung.name: rung for rung in GENERATE_LADDER}


def pixel_difference(first: bytes, second: bytes) -> int:
    """The largest difference between two PNGs' 8-bit values."""
    a, b = (
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)
        for data in (first, second)
    )
    return int(np.abs(a - b).max())


def png_text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return dict(image.text)  # type: ignore[attr-defined]


NOT_ALLOCATING = {"generate.written"}
"""Between a file's write and its record: nothing allocates there (the kill tests cover it)."""


def gpu_points() -> list[str]:
    return [
        point
        for point, stage in fault_points().items()
        if stage in GPU_STAGES and point not in NOT_ALLOCATING
    ]


def _ooms_and_retries(home: Home, job: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (
            e["type"],
            e["data"]["memory_rung"] if e["type"] == "OutOfMemory" else e["data"]["next_rung"],
        )
        for e in home.events_of(job["id"])
        if e["type"] in ("OutOfMemory", "RetryScheduled")
    ]


def test_every_gpu_fault_point_is_covered() -> None:
    once = {fault.split("@")[1].split(":")[0] for fault in ONCE}
    assert len(once) == len(ONCE)
    always = {point for run in ALWAYS for point in run}
    assert once == set(gpu_points()) == always


def test_oom_once_at_every_gpu_point_moves_one_rung_down_and_finishes(
    home: Home, reference_outputs: Reference
) -> None:
    reference = reference_outputs()
    drop_dataset(home)
    jobs = finish(home, PromptDropper(), faults=",".join(ONCE))
    assert [j["state"] for j in jobs] == ["succeeded"] * len(jobs), [
        (j["stage"], j["error"]) for j in jobs
    ]
    by_stage = {job["stage"]: job for job in jobs}
    fired = {stage: sum(f.split("@")[1].startswith(stage) for f in ONCE) for stage in GPU_STAGES}
    for stage in GPU_STAGES:
        job = by_stage[stage]
        steps = _ooms_and_retries(home, job)
        # OutOfMemory at rung r is followed by RetryScheduled to r + 1, rung after rung
        expected = []
        for rung in range(fired[stage]):
            expected += [("OutOfMemory", rung), ("RetryScheduled", rung + 1)]
        assert steps == expected, (stage, steps)
        assert job["memory_rung"] == fired[stage]
        started = [
            e["data"]["memory_rung"] for e in home.events_of(job["id"]) if e["type"] == "JobStarted"
        ]
        assert started == list(range(fired[stage] + 1)), (stage, started)
        rung_name = get_stage(stage).rung(fired[stage]).name
        result = job["result"]
        if "memory_rung" in result:
            assert result["memory_rung"] == rung_name, (stage, result["memory_rung"])
    assert_same_math(collect_outputs(home.root), reference)


def assert_same_math(got: Outputs, reference: Outputs) -> None:
    """What the rungs leave unchanged, measured on CPU: the LoRA's weights (the cache's half
    VAE batch, the train stage's gradient checkpointing and smaller micro-batches are the
    same math), and the pixels of every image made at a rung without attention slicing (VAE
    slicing, VAE tiling and CPU offload are exact). Sliced attention adds its terms in
    another order: an image made with it may differ by one level in a few 8-bit values.
    The files themselves record the rung they were made at, so headers are not compared.
    """
    assert sorted(got.files) == sorted(reference.files)
    different, sliced = [], []
    for path, expected in reference.files.items():
        found = got.files[path]
        if path.endswith(".safetensors"):
            same = found[1] == expected[1]  # the data section
        elif path.startswith("images/") and Path(path).name[0].isdigit():
            diff = pixel_difference(found, expected)
            rung = json.loads(png_text(found)["dropkiln"])["memory_rung"]
            if GENERATE_RUNGS[rung].options.get("attention_slicing"):
                same = diff <= 1
                if diff:
                    sliced.append(path)
            else:
                same = diff == 0
        elif path.endswith(".png"):
            same = png_pixels(found) == png_pixels(expected)
        else:
            same = found == expected
        if not same:
            different.append(path)
    # The contact sheet and the video are made from the images.
    derived = ["images/pictures/contact-sheet.png", "videos/pictures.mp4"] if sliced else []
    assert not set(different) - set(derived), f"the memory rungs changed: {different}"


ALWAYS = (
    ("train.backward", "generate.decode"),
    ("cache.batch", "generate.image"),
    ("train.checkpoint", "generate.step"),
    ("train.step",),
    ("train.forward",),
    ("cache.encode",),
)
"""Points that fire at every hit, two stages a run at most: the first point of a stage that
fires every time leaves the later ones unreached, hence a run per point of the train stage.
The short form runs the first: inside a backward and inside a VAE decode."""


@pytest.mark.parametrize(
    "points",
    [pytest.param(ALWAYS[0], id="train.step+generate.decode")]
    + [pytest.param(run, id="+".join(run), marks=pytest.mark.full) for run in ALWAYS[1:]],
)
def test_oom_at_every_rung_fails_naming_the_rungs_tried(
    home: Home, points: tuple[str, ...]
) -> None:
    drop_dataset(home)
    staged = home.staging(f"{PROMPTS}.toml")
    staged.write_text(PLAIN_PROMPT)
    home.drop(staged, "prompts")
    home.start(faults=",".join(f"oom@{point}" for point in points))
    home.wait_serving()
    jobs = home.wait_all_done(5, 240)
    assert home.terminate() == 0
    by_stage = {job["stage"]: job for job in jobs}
    for point in points:
        stage = point.split(".")[0]
        job = by_stage[stage]
        ladder = get_stage(stage).ladder
        assert job["state"] == "failed", (stage, job["state"], job["error"])
        tried = ", ".join(rung.name for rung in ladder)
        assert f"out of memory on every memory rung (tried: {tried})" in job["error"], job["error"]
        assert f"injected at {point}" in job["error"]
        steps = _ooms_and_retries(home, job)
        expected = []
        for rung in range(len(ladder)):
            expected.append(("OutOfMemory", rung))
            if rung + 1 < len(ladder):
                expected.append(("RetryScheduled", rung + 1))
        assert steps == expected, (stage, steps)
        for dependent in jobs:
            if job["id"] in dependent["depends_on"]:
                assert dependent["state"] == "failed"
                assert re.search(rf"dependency {stage} job {job['id']} failed", dependent["error"])
    check = home.cli("store", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert not list(Path(home.root / "outputs").rglob(".*"))
