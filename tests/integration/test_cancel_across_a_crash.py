"""A cancel written around a kill -9 is carried out at the restart: the job ends cancelled
and does not run again (issue 10, defect 2), with a real daemon process and a real kill."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.daemon_process import SMALL_CONFIG, DaemonProcess, all_done
from tests.samples import write_dataset

pytestmark = pytest.mark.slow


def test_defect02_cancel_of_a_running_job_survives_kill_9(tmp_path: Path) -> None:
    root = tmp_path / "home"
    root.mkdir()
    # Long enough to still be training when killed.
    (root / "dropkiln.toml").write_text(SMALL_CONFIG.replace("steps = 6", "steps = 400"))
    daemon = DaemonProcess(root)
    daemon.start()
    daemon.wait_serving()
    staging = write_dataset(root / "staging" / "cats", count=4, size=64)
    staging.rename(root / "drop" / "datasets" / "cats")

    def training(status: dict[str, object]) -> bool:
        jobs = status["jobs"]
        assert isinstance(jobs, list)
        return any(j["stage"] == "train" and j["state"] == "running" for j in jobs)

    status = daemon.wait_for(training, timeout=180)
    train = next(j for j in status["jobs"] if j["stage"] == "train")
    daemon.kill()
    cancel = daemon.cli("cancel", train["id"])
    assert cancel.returncode == 0, cancel.stderr
    daemon.start()
    status = daemon.wait_for(all_done(3), timeout=120)
    assert daemon.terminate() == 0
    states = {j["stage"]: j["state"] for j in status["jobs"]}
    assert states == {"bucket": "succeeded", "cache": "succeeded", "train": "cancelled"}
    train_events = [e["type"] for e in daemon.events() if e["stream"] == f"job:{train['id']}"]
    assert train_events.count("JobStarted") == 1, train_events
    assert train_events[-3:] == ["CancelRequested", "JobInterrupted", "JobCancelled"]
    assert "JobSucceeded" not in train_events
