"""`store check` sees a history the live code got wrong, not only rows that differ from a
replay. Each history below goes through the real append path, so its projections replay
exactly: only a check of the state machine itself can find what is wrong with it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dropkiln.store import EventStore, check
from dropkiln.store import events as ev
from dropkiln.store.events import job_stream

from .builders import submitted, tamper


async def write(store: EventStore, job_id: str, *history: ev.Event) -> None:
    await store.append(job_stream(job_id), [submitted(job_id), *history])


def started(attempt: int = 1) -> ev.JobStarted:
    return ev.JobStarted(attempt=attempt, memory_rung=0)


async def test_a_whole_valid_life_with_oom_preemption_and_a_retry_passes(
    store: EventStore,
) -> None:
    await write(
        store,
        "good",
        ev.JobQueued(),
        started(1),
        ev.JobProgress(done=1, total=4),
        ev.CheckpointSaved(state={"step": 1}),
        ev.OutOfMemory(memory_rung=0, rung_name="default", snapshot={}, message="oom"),
        ev.RetryScheduled(next_rung=1, rung_name="lighter"),
        started(2),
        ev.JobPreempted(by="generate"),
        started(3),
        ev.CancelRequested(),
        ev.JobCancelled(),
        ev.RetryRequested(),
        ev.JobQueued(reason="retry"),
        started(4),
        ev.JobInterrupted(previous_attempt=4),
        ev.JobQueued(reason="daemon restarted"),
        started(5),
        ev.JobSucceeded(),
    )
    await write(store, "dep-failed", ev.JobFailed(reason="dependency failed"))
    report = await check(store)
    assert report.violations == []
    assert report.ok


async def test_rule_legal_transitions_only(store: EventStore) -> None:
    await write(store, "j", ev.JobSucceeded())  # never started
    await write(store, "k", started(), ev.RetryScheduled(next_rung=1, rung_name="x"))
    report = await check(store)
    assert not report.ok
    assert report.differences == []  # the projections agree with the replay
    assert report.violations == [
        "job j: JobSucceeded (v2) is not a legal transition from queued",
        "job k: RetryScheduled (v3) is not a legal transition from running",
    ]


async def test_rule_one_terminal_event_per_ending(store: EventStore) -> None:
    # The race of issue 10: a cancel recorded, then the attempt ran on and succeeded.
    await write(store, "twice", started(), ev.JobCancelled(), ev.JobSucceeded())
    report = await check(store)
    assert (
        "job twice: ended twice without a retry or requeue between: "
        "JobCancelled (v3) then JobSucceeded (v4)"
    ) in report.violations


async def test_rule_no_start_after_an_ending_without_a_requeue(store: EventStore) -> None:
    await write(store, "again", ev.JobCancelled(), started(), ev.JobSucceeded())
    report = await check(store)
    assert (
        "job again: JobStarted (v3) after JobCancelled (v2) with no retry or requeue between"
    ) in report.violations
    # With a requeue between, the same start is legal.
    await write(store, "retried", ev.JobCancelled(), ev.JobQueued(reason="retry"), started())
    assert not [v for v in (await check(store)).violations if "retried" in v]


async def test_rule_versions_contiguous_per_stream(store: EventStore) -> None:
    await write(store, "gap", ev.JobQueued(), started(), ev.JobSucceeded())
    await tamper(store, "UPDATE events SET version = 7 WHERE stream = 'job:gap' AND version = 2")
    report = await check(store)
    assert "job:gap: version 7 follows version 1 (versions must be contiguous)" in (
        report.violations
    )
    assert "job:gap: version 3 follows version 7 (versions must be contiguous)" in (
        report.violations
    )


async def test_rule_every_artifact_is_on_disk_with_its_hash(
    store: EventStore, tmp_path: Path
) -> None:
    kept, changed, gone = (tmp_path / name for name in ("kept.png", "changed.png", "gone.png"))
    for path in (kept, changed, gone):
        path.write_bytes(b"image " + path.name.encode())

    def written(path: Path) -> ev.ArtifactWritten:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        return ev.ArtifactWritten(path=str(path), kind="image", bytes=len(data), sha256=digest)

    await write(store, "a", started(), written(kept), written(changed), written(gone))
    assert (await check(store)).ok
    changed.write_bytes(b"image CHANGED.png")  # same size, other bytes
    gone.unlink()
    report = await check(store)
    assert sorted(report.violations) == [
        f"job a: artifact {changed}: sha256 on disk differs from the recorded one",
        f"job a: artifact {gone}: missing (No such file or directory)",
    ]
    # The newest record of a path is what counts: recording the new file makes it whole.
    await store.append(job_stream("a"), [written(changed)])
    assert [v for v in (await check(store)).violations if "changed" in v] == []
