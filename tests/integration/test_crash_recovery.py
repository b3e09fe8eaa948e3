"""Kill -9 a real daemon at random moments mid-pipeline; every job still ends exactly once."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.integration.daemon_process import DaemonProcess, all_done, terminal_events_per_job
from tests.samples import write_dataset

pytestmark = pytest.mark.slow


def _drop_datasets(root: Path, names: list[str]) -> None:
    for name in names:
        staging = root / "staging" / name
        write_dataset(staging, count=4, size=64)
        target = root / "drop" / "datasets" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)


def test_kill_9_at_random_moments_then_restart_finishes_every_job_once(tmp_path: Path) -> None:
    root = tmp_path / "home"
    daemon = DaemonProcess(root)
    rng = random.Random(7)
    names = ["alpha", "beta", "gamma"]
    _drop_datasets(root, names)
    kills = 0
    for _ in range(4):
        daemon.start()
        time.sleep(rng.uniform(0.8, 3.0))
        daemon.kill()
        kills += 1
    daemon.start()
    daemon.wait_serving()
    status = daemon.wait_for(
        lambda s: all_done(len(names))(s) and not any((root / "drop" / "datasets").iterdir()),
        timeout=120,
    )
    assert daemon.terminate() == 0
    jobs = status["jobs"]
    assert {j["state"] for j in jobs} == {"succeeded"}, jobs
    events = daemon.events()
    ends = terminal_events_per_job(events)
    assert all(v == ["JobSucceeded"] for v in ends.values()), ends
    assert len(ends) == len(jobs)
    dropped = [e["data"]["name"] for e in events if e["type"] == "Dropped"]
    assert sorted(dropped) == sorted(names)
    assert sorted(p.name.split("-", 1)[1] for p in (root / "drop" / "processed").iterdir()) == names
    check = daemon.cli("store", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert kills == 4
