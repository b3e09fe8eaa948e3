"""Kill -9 the daemon at random moments, and at every fault point, through the pipeline
dataset → LoRA → prompt file using it → images → video; restart each time.

Every job ends exactly once, nothing is taken twice or half-written, the store checks out,
and the LoRA and the images are the undisturbed run's, bit for bit.
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.conftest import Reference
from tests.reliability.faultpoints import fault_points
from tests.reliability.home import CONFIG, TERMINAL, Home
from tests.reliability.pipeline import (
    JOBS,
    STANDARD,
    Pipeline,
    PromptDropper,
    assert_finished_once,
    drop_dataset,
    finish,
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Kill:
    events: int
    """Events the daemon appended in this life before the kill."""
    running: tuple[str, ...]
    """The stages whose jobs were running when the kill landed."""


STAGES = ("bucket", "cache", "train", "generate", "video")
SHORT_STAGES = {"bucket": 0.05, "cache": 2.5, "video": 0.1}
"""Stages over between two progress reports (the cache's time is mostly the model load): a
point in them is a moment after they start, a fraction of about this many seconds."""


@dataclass(frozen=True)
class Target:
    """Kill once the ``stage`` job, started in this life, is ``fraction`` of the way through."""

    stage: str
    fraction: float


def plan_kills(rng: random.Random, per_stage: dict[str, int]) -> list[Target]:
    """Random points in each stage, in pipeline order (a resumed job goes on from where the
    last kill left it, so each next point is further in)."""
    return [
        Target(stage, fraction)
        for stage in STAGES
        for fraction in sorted(rng.random() for _ in range(per_stage.get(stage, 0)))
    ]


def _pipeline_done(home: Home) -> bool:
    jobs = home.jobs()
    return len(jobs) >= JOBS and all(j["state"] in TERMINAL for j in jobs)


def kill_at(home: Home, target: Target, rng: random.Random, prompts: PromptDropper) -> Kill:
    """One life: start, wait for the target point (or for its job to be over), wait a random
    moment more, then SIGKILL."""
    home.start()
    home.wait_serving()
    began = home.started_seq()
    deadline = time.monotonic() + 60
    started: float | None = None
    while time.monotonic() < deadline and not _pipeline_done(home):
        prompts.poll(home)
        job = next((j for j in home.jobs() if j["stage"] == target.stage), None)
        if job is not None and job["state"] in TERMINAL:
            break
        events = home.events_of(job["id"]) if job is not None else []
        now = [e for e in events if e["seq"] > began]
        if started is None and any(e["type"] == "JobStarted" for e in now):
            started = time.monotonic()
        if started is not None and target.stage in SHORT_STAGES:
            if time.monotonic() - started >= target.fraction * SHORT_STAGES[target.stage]:
                break
        elif started is not None:
            progress = [e["data"] for e in now if e["type"] == "JobProgress"]
            if progress and progress[-1]["done"] >= target.fraction * progress[-1]["total"]:
                break
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.15))
    running = tuple(j["stage"] for j in home.jobs() if j["state"] == "running")
    appended = home.last_seq() - began
    home.kill()
    return Kill(appended, running)


LONG = Pipeline(
    CONFIG.replace("steps = 8\n", "steps = 160\n").replace(
        "checkpoint_every = 2\n", "checkpoint_every = 8\n"
    ),
    count=6,
    image_steps=12,
)
"""For the long form: training and generation that last seconds even on an idle machine,
where progress (reported about twice a second) shows how far in a job is."""


@pytest.mark.parametrize(
    ("pipeline", "per_stage", "seed"),
    [
        pytest.param(STANDARD, {"cache": 1, "train": 2, "generate": 1, "video": 1}, 11,
                     id="5-kills"),
        pytest.param(LONG, {"bucket": 2, "cache": 4, "train": 8, "generate": 8, "video": 2}, 29,
                     id="24-kills", marks=pytest.mark.full),
    ],
)  # fmt: skip
def test_kill_9_at_random_moments_changes_nothing(
    tmp_path: Path,
    reference_outputs: Reference,
    pipeline: Pipeline,
    per_stage: dict[str, int],
    seed: int,
) -> None:
    reference = reference_outputs(pipeline)
    home = pipeline.home(tmp_path / "home")
    rng = random.Random(seed)
    prompts = PromptDropper(pipeline)
    drop_dataset(home)
    targets = plan_kills(rng, per_stage)
    try:
        done = [kill_at(home, target, rng, prompts) for target in targets]
        jobs = finish(home, prompts)
    finally:
        home.stop()
    summary = ", ".join(
        f"{t.stage}@{t.fraction:.2f}:{'+'.join(k.running) or 'idle'}"
        for t, k in zip(targets, done, strict=True)
    )
    print(f"{len(done)} kills (target: running) {summary}")
    assert len(done) == sum(per_stage.values()) >= (20 if pipeline is LONG else 4)
    assert_finished_once(home, jobs, reference, pipeline)
    mid_job = [k for k in done if k.running]
    assert len(mid_job) >= len(done) // 2, f"only {len(mid_job)} kills landed in a job"


KILL_POINTS = (
    "kill@bucket.image:3",
    "kill@cache.batch:2",
    "kill@cache.encode:1",
    "kill@train.step:3",
    "kill@train.forward:2",
    "kill@train.backward:3",
    "kill@train.checkpoint:2",
    "kill@generate.step:5",
    "kill@generate.decode:2",
    "kill@generate.image:1",
    "kill@generate.written:1",
    "kill@video.frame:5",
)
"""One kill at every fault point, in pipeline order; each restart resumes from the last."""


def test_kill_points_cover_every_fault_point() -> None:
    killed = {fault.split("@")[1].split(":")[0] for fault in KILL_POINTS}
    assert killed == set(fault_points())


def test_kill_9_at_every_fault_point_changes_nothing(
    home: Home, reference_outputs: Reference
) -> None:
    reference = reference_outputs()
    prompts = PromptDropper()
    drop_dataset(home)
    for fault in KILL_POINTS:
        stage = fault.split("@")[1].split(".")[0]
        home.start(faults=fault)
        deadline = time.monotonic() + 120
        while home.alive() and time.monotonic() < deadline:
            prompts.poll(home)
            time.sleep(0.05)
        assert not home.alive(), f"{fault} never fired:\n{home.log_text()[-3000:]}"
        home.kill()
        assert home.proc is not None and home.proc.returncode == -signal.SIGKILL, fault
        running = [j["stage"] for j in home.jobs() if j["state"] == "running"]
        assert running == [stage], (fault, running)
    jobs = finish(home, prompts)
    assert_finished_once(home, jobs, reference)
    for job in jobs:
        kinds = [e["type"] for e in home.events_of(job["id"])]
        killed_in = sum(fault.split("@")[1].startswith(job["stage"] + ".") for fault in KILL_POINTS)
        assert kinds.count("JobInterrupted") == killed_in, (job["stage"], kinds)
