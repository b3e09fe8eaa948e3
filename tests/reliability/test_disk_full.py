"""A full disk while writing a cache shard, a checkpoint, an image or a video frame.

The job fails with a reason that says the disk is full, nothing half-written is left where
an output or a checkpoint is looked for, and once there is room again ``dropkiln retry``
resumes the job and the outputs are the undisturbed run's, bit for bit.

Injected (``enospc@POINT``, everywhere) and real (a small tmpfs mounted over part of ROOT,
when this process may mount: root in a sandbox; otherwise that test is skipped).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.reliability.conftest import Reference
from tests.reliability.home import TERMINAL, Home
from tests.reliability.pipeline import (
    JOBS,
    PromptDropper,
    drop_dataset,
)

pytestmark = pytest.mark.slow

DISK_FULL = ("No space left on device", "os error 28")
ENOSPC_POINTS = (
    "enospc@cache.batch:2",
    "enospc@train.checkpoint:2",
    "enospc@generate.image:2",
    "enospc@video.frame:3",
)
"""The fault points right before a write: a shard batch, a checkpoint, an image, a frame."""


def _all_ended(prompts: PromptDropper) -> Any:
    def ended(home: Home) -> bool:
        prompts.poll(home)
        jobs = home.jobs()
        return len(jobs) >= JOBS and all(job["state"] in TERMINAL for job in jobs)

    return ended


def retry_until_done(home: Home, prompts: PromptDropper, fix: Any = None) -> list[str]:
    """Wait for every job to end; retry the job the full disk failed (after ``fix(job)``
    made room) until none is left; returns the stages retried, in order."""
    retried = []
    while True:
        home.wait_for(_all_ended(prompts), 240, "every job to end")
        jobs = home.jobs()
        full = [j for j in jobs if j["state"] == "failed" and "dependency" not in j["error"]]
        if not full:
            return retried
        job = full[0]
        assert any(text in job["error"] for text in DISK_FULL), (job["stage"], job["error"])
        stray = [p for p in (home.root / "outputs").rglob("*") if p.name.startswith(".")]
        assert not stray, f"a failed write left {stray}"
        if fix is not None:
            fix(job)
        before = home.last_seq()
        result = home.cli("retry", job["id"])
        assert result.returncode == 0, result.stderr
        # the daemon takes the command within its poll interval
        home.wait_for(lambda h: any(e["type"] == "JobQueued" for e in h.events(before)), 30)
        retried.append(job["stage"])


def test_disk_full_at_every_write_point_fails_cleanly_and_retry_resumes(
    home: Home, reference_outputs: Reference
) -> None:
    reference = reference_outputs()
    prompts = PromptDropper()
    drop_dataset(home)
    home.start(faults=",".join(ENOSPC_POINTS))
    home.wait_serving()
    retried = retry_until_done(home, prompts)
    assert retried == ["cache", "train", "generate", "video"]
    assert home.terminate() == 0
    jobs = home.jobs()
    for job in jobs:
        kinds = [e["type"] for e in home.events_of(job["id"])]
        assert kinds.count("JobSucceeded") == 1, (job["stage"], kinds)
    assert_retried_outputs(home, jobs, reference)


def assert_retried_outputs(home: Home, jobs: list[dict[str, Any]], reference: Any) -> None:
    """``assert_finished_once``, allowing for the failed attempts the retries ended."""
    assert [j["state"] for j in jobs] == ["succeeded"] * JOBS
    from tests.reliability.pipeline import (
        assert_outputs_whole,
        assert_same_outputs,
        collect_outputs,
    )

    check = home.cli("store", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert_outputs_whole(home.root, jobs)
    assert_same_outputs(collect_outputs(home.root), reference)
