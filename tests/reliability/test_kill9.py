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

import pytest

from tests.reliability.conftest import Reference
from tests.reliability.faultpoints import fault_points
from tests.reliability.home import TERMINAL, Home
from tests.reliability.pipeline import (
    JOBS,
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


def _pipeline_done(home: Home) -> bool:
    jobs = home.jobs()
    return len(jobs) >= JOBS and all(j["state"] in TERMINAL for j in jobs)


def kill_after_random_events(
    home: Home, rng: random.Random, events: tuple[int, int], prompts: PromptDropper
) -> Kill:
    """One life: start, let it append a random number of events (a time measured in work,
    not seconds, so a slow model load does not soak up every kill), wait a random moment
    more, then SIGKILL."""
    home.start()
    home.wait_serving()
    first = home.last_seq()
    wanted = rng.randint(*events)
    deadline = time.monotonic() + 60
    while home.last_seq() - first < wanted and time.monotonic() < deadline:
        prompts.poll(home)
        if _pipeline_done(home):
            break
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    running = tuple(j["stage"] for j in home.jobs() if j["state"] == "running")
    appended = home.last_seq() - first
    home.kill()
    return Kill(appended, running)


@pytest.mark.parametrize(
    ("kills", "events", "seed"),
    [
        pytest.param(5, (4, 14), 11, id="5-kills"),
        pytest.param(24, (3, 9), 29, id="24-kills", marks=pytest.mark.full),
    ],
)
def test_kill_9_at_random_moments_changes_nothing(
    home: Home, reference_outputs: Reference, kills: int, events: tuple[int, int], seed: int
) -> None:
    reference = reference_outputs()
    rng = random.Random(seed)
    prompts = PromptDropper()
    drop_dataset(home)
    done = [kill_after_random_events(home, rng, events, prompts) for _ in range(kills)]
    jobs = finish(home, prompts)
    summary = ", ".join(f"{k.events}:{'+'.join(k.running) or 'idle'}" for k in done)
    print(f"{len(done)} kills (events in life:running) {summary}")
    assert len(done) == kills
    assert_finished_once(home, jobs, reference)


KILL_POINTS = (
    "kill@bucket.image:3",
    "kill@cache.batch:2",
    "kill@train.step:3",
    "kill@train.checkpoint:2",
    "kill@generate.step:5",
    "kill@generate.decode:2",
    "kill@generate.image:1",
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
