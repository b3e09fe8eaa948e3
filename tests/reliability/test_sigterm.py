"""SIGTERM in the middle of training (systemctl stop): the daemon checkpoints the running
job, records DaemonStopped and exits 0 well within the unit's TimeoutStopSec; at the next
start the job resumes from that checkpoint and the LoRA is the undisturbed run's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.conftest import Reference
from tests.reliability.home import CONFIG, Home
from tests.reliability.pipeline import (
    Outputs,
    Pipeline,
    PromptDropper,
    assert_finished_once,
    drop_dataset,
    finish,
)

pytestmark = pytest.mark.slow

UNIT_STOP_TIMEOUT_S = 120
LONGER_TRAINING = Pipeline(
    CONFIG.replace("steps = 8\n", "steps = 200\n").replace(
        "checkpoint_every = 2\n", "checkpoint_every = 200\n"
    )
)
"""Long enough that the stop lands mid-training, with a checkpoint only at the last step:
whatever step the stop finds, only the stop itself can have saved it."""


def _stop_timeout_of_the_unit() -> int:
    unit = Path(__file__).resolve().parents[2] / "systemd" / "dropkiln.service"
    line = next(x for x in unit.read_text().splitlines() if x.startswith("TimeoutStopSec="))
    return int(line.split("=", 1)[1])


def test_sigterm_mid_training_checkpoints_and_resumes_after_restart(
    tmp_path: Path, reference_outputs: Reference
) -> None:
    assert _stop_timeout_of_the_unit() == UNIT_STOP_TIMEOUT_S
    reference = reference_outputs(LONGER_TRAINING)
    home = LONGER_TRAINING.home(tmp_path / "home")
    try:
        stop_and_resume(home, reference)
    finally:
        home.stop()


def stop_and_resume(home: Home, reference: Outputs) -> None:
    prompts = PromptDropper()
    drop_dataset(home)
    home.start()
    home.wait_serving()

    def training_between_checkpoints(h: Home) -> bool:
        prompts.poll(h)
        train = next((j for j in h.jobs() if j["stage"] == "train"), None)
        # the first step is reported at once; the stop lands a few steps later
        return train is not None and train["state"] == "running" and train["done"] >= 1

    home.wait_for(training_between_checkpoints, 120, "training to start")
    train_id = next(j["id"] for j in home.jobs() if j["stage"] == "train")
    asked = time.monotonic()
    assert home.terminate(timeout=UNIT_STOP_TIMEOUT_S) == 0, home.log_text()[-3000:]
    stopped_in = time.monotonic() - asked
    assert stopped_in < UNIT_STOP_TIMEOUT_S / 4, f"took {stopped_in:.1f} s to stop"

    events = home.events()
    daemon = [e["type"] for e in events if e["stream"] == "daemon"]
    assert daemon[-2:] == ["DaemonStopping", "DaemonStopped"], daemon
    stopped = next(e for e in reversed(events) if e["type"] == "DaemonStopped")
    assert stopped["data"]["requeued"] == [train_id]
    before_stop = [e for e in home.events_of(train_id) if e["seq"] < stopped["seq"]]
    saved = [e["data"]["state"]["step"] for e in before_stop if e["type"] == "CheckpointSaved"]
    stepped = max(e["data"]["done"] for e in before_stop if e["type"] == "JobProgress")
    assert saved == [stepped] and 1 <= stepped < 200, "the stop did not checkpoint its step"
    assert before_stop[-1]["type"] == "JobPreempted", before_stop[-1]
    assert next(j for j in home.jobs() if j["id"] == train_id)["state"] == "queued"

    resume_at = len(home.events_of(train_id))
    jobs = finish(home, prompts)
    after = home.events_of(train_id)[resume_at:]
    started = next(e for e in after if e["type"] == "JobStarted")
    assert started["data"]["attempt"] == 2
    first_step = next(e["data"]["done"] for e in after if e["type"] == "JobProgress")
    assert first_step == saved[-1] + 1, "the restarted job did not resume from its checkpoint"
    assert_finished_once(home, jobs, reference)
    print(f"stopped in {stopped_in:.1f} s, resumed at step {first_step}")
