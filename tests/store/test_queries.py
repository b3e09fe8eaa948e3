"""Read models: job lists, lookups, remembered rungs, the queue and the daemon's state."""

from __future__ import annotations

import time

import pytest

from dropkiln.store import (
    EventStore,
    StoreError,
    clean_runs,
    daemon_state,
    drop_by_hash,
    find_job,
    job_artifacts,
    list_drops,
    list_jobs,
    queue_paused,
    recent_telemetry,
    record_telemetry,
    remembered_rung,
)
from dropkiln.store import events as ev
from dropkiln.store.events import DAEMON_STREAM, drop_stream, job_stream

from .builders import submitted


async def run_job(
    store: EventStore, job_id: str, ending: ev.Event, rung_key: str | None = None, rung: int = 0
) -> None:
    await store.append(
        job_stream(job_id),
        [
            submitted(job_id, memory_rung=rung, rung_key=rung_key),
            ev.JobQueued(),
            ev.JobStarted(attempt=1, memory_rung=rung),
            ending,
        ],
    )


async def test_list_jobs_newest_first_with_waiting(store: EventStore) -> None:
    await store.append(job_stream("bucket1"), [submitted("bucket1"), ev.JobQueued()])
    await store.append(
        job_stream("cache1"), [submitted("cache1", depends_on=["bucket1"]), ev.JobQueued()]
    )
    await store.append(job_stream("solo"), [submitted("solo"), ev.JobQueued()])
    jobs = await list_jobs(store)
    assert [(j.id, j.state) for j in jobs] == [
        ("solo", "queued"),
        ("cache1", "waiting"),
        ("bucket1", "queued"),
    ]
    await store.append(
        job_stream("bucket1"),
        [ev.JobStarted(attempt=1, memory_rung=0), ev.JobFailed(reason="no images")],
    )
    assert {j.id: j.state for j in await list_jobs(store)}["cache1"] == "waiting"
    await store.append(
        job_stream("bucket1"),
        [ev.JobQueued(), ev.JobStarted(attempt=2, memory_rung=0), ev.JobSucceeded()],
    )
    states = {j.id: j.state for j in await list_jobs(store)}
    assert states == {"solo": "queued", "cache1": "queued", "bucket1": "succeeded"}


async def test_list_jobs_limit_still_sees_older_dependencies(store: EventStore) -> None:
    await run_job(store, "first", ev.JobSucceeded())
    await store.append(job_stream("pending"), [submitted("pending"), ev.JobQueued()])
    for index in range(3):
        job_id = f"later{index}"
        deps = ["first"] if index % 2 else ["pending"]
        await store.append(job_stream(job_id), [submitted(job_id, depends_on=deps), ev.JobQueued()])
    jobs = await list_jobs(store, limit=3)
    assert [(j.id, j.state) for j in jobs] == [
        ("later2", "waiting"),
        ("later1", "queued"),
        ("later0", "waiting"),
    ]


async def test_list_jobs_active_only(store: EventStore) -> None:
    await run_job(store, "done", ev.JobSucceeded())
    await run_job(store, "broken", ev.JobFailed(reason="x"))
    await store.append(job_stream("next"), [submitted("next"), ev.JobQueued()])
    await store.append(job_stream("busy"), [submitted("busy"), ev.JobQueued()])
    await store.append(job_stream("busy"), [ev.JobStarted(attempt=1, memory_rung=0)])
    active = await list_jobs(store, active_only=True)
    assert [(j.id, j.state) for j in active] == [("busy", "running"), ("next", "queued")]


async def test_job_view_progress_and_summary(store: EventStore) -> None:
    await store.append(
        job_stream("a"),
        [
            submitted("a"),
            ev.JobQueued(),
            ev.JobStarted(attempt=1, memory_rung=1),
            ev.JobProgress(done=1, total=4, metrics={"loss": 0.5}),
        ],
    )
    [job] = await list_jobs(store)
    assert job.progress == 0.25
    assert not job.terminal
    summary = job.summary()
    assert summary["state"] == "running"
    assert summary["progress"] == 0.25
    assert summary["attempt"] == 1
    assert summary["metrics"] == {"loss": 0.5}
    await store.append(job_stream("a"), [ev.JobSucceeded()])
    assert (await find_job(store, "a")).progress == 1.0


async def test_find_job_by_id_or_prefix(store: EventStore) -> None:
    for job_id in ("3f9a01", "3f9b02", "3f9b02x", "77aa"):
        await store.append(job_stream(job_id), [submitted(job_id)])
    assert (await find_job(store, "77")).id == "77aa"
    assert (await find_job(store, "3f9a")).id == "3f9a01"
    # An exact id wins even when it is also the prefix of another id.
    assert (await find_job(store, "3f9b02")).id == "3f9b02"
    with pytest.raises(StoreError, match=r"ambiguous: it matches 3f9a01, 3f9b02"):
        await find_job(store, "3f9")
    with pytest.raises(StoreError, match="no job 'zz'"):
        await find_job(store, "zz")
    # LIKE wildcards in a reference are literal characters.
    with pytest.raises(StoreError, match="no job"):
        await find_job(store, "3f9_01")


async def test_find_job_reports_waiting(store: EventStore) -> None:
    await store.append(job_stream("a"), [submitted("a"), ev.JobQueued()])
    await store.append(job_stream("b"), [submitted("b", depends_on=["a"]), ev.JobQueued()])
    assert (await find_job(store, "b")).state == "waiting"


async def test_remembered_rung(store: EventStore) -> None:
    key = "tiny-sdxl/train/1024"
    assert await remembered_rung(store, key) == 0
    await run_job(store, "ok1", ev.JobSucceeded(), key, rung=2)
    await run_job(store, "oom", ev.JobFailed(reason="ladder exhausted"), key, rung=4)
    await run_job(store, "other", ev.JobSucceeded(), "tiny-sdxl/train/512", rung=1)
    assert await remembered_rung(store, key) == 2
    await run_job(store, "ok2", ev.JobSucceeded(), key, rung=3)
    assert await remembered_rung(store, key) == 3
    assert await remembered_rung(store, "tiny-sdxl/train/512") == 1


async def test_clean_runs_count_back_to_a_different_rung_or_an_oom(store: EventStore) -> None:
    key = "train:sdxl:1024"
    await run_job(store, "old", ev.JobSucceeded(), key, rung=1)
    await store.append(
        job_stream("probe"),
        [
            submitted("probe", rung_key=key),
            ev.JobQueued(),
            ev.JobStarted(attempt=1, memory_rung=1),
            ev.OutOfMemory(memory_rung=1, rung_name="r1", snapshot={}, message="OOM"),
            ev.RetryScheduled(next_rung=2, rung_name="r2"),
            ev.JobStarted(attempt=2, memory_rung=2),
            ev.JobSucceeded(),
        ],
    )
    assert await clean_runs(store, key, 2, 5) == 0  # the newest success ran out of memory
    for n in range(3):
        await run_job(store, f"ok{n}", ev.JobSucceeded(), key, rung=2)
    await run_job(store, "failed", ev.JobFailed(reason="bad"), key, rung=2)
    await run_job(store, "elsewhere", ev.JobSucceeded(), "train:sdxl:512", rung=2)
    assert await clean_runs(store, key, 2, 5) == 3
    assert await clean_runs(store, key, 2, 2) == 2
    assert await clean_runs(store, key, 1, 5) == 0


async def test_queue_paused_follows_the_last_command(store: EventStore) -> None:
    assert not await queue_paused(store)
    await store.append(DAEMON_STREAM, [ev.QueuePaused()])
    assert await queue_paused(store)
    await store.append(
        DAEMON_STREAM, [ev.DaemonStarted(pid=1, host="h", version="0", device="cpu", root="/")]
    )
    assert await queue_paused(store)
    await store.append(DAEMON_STREAM, [ev.QueueResumed(by="tui")])
    assert not await queue_paused(store)


async def test_daemon_state_needs_a_recent_heartbeat(store: EventStore) -> None:
    state = await daemon_state(store)
    assert (state.running(), state.last_event, state.pid, state.seen_ago()) == (
        False,
        None,
        None,
        None,
    )
    started = ev.DaemonStarted(pid=4242, host="box", version="0.1", device="cuda", root="/r")
    await store.append(DAEMON_STREAM, [started, ev.QueuePaused()])
    state = await daemon_state(store)
    assert not state.running()  # started, but no heartbeat yet
    assert (state.last_event, state.pid, state.device) == ("DaemonStarted", 4242, "cuda")

    await record_telemetry(store, {"device": "cuda", "at": time.time() - 60}, retention_s=600)
    assert not (await daemon_state(store)).running()  # heartbeat too old: the daemon died
    await record_telemetry(store, {"device": "cuda"}, retention_s=600)
    state = await daemon_state(store)
    assert state.running()
    seen = state.seen_ago()
    assert seen is not None and 0 <= seen < 5

    await store.append(DAEMON_STREAM, [ev.DaemonStopping(reason="SIGTERM")])
    assert (await daemon_state(store)).running()
    await store.append(DAEMON_STREAM, [ev.DaemonStopped()])
    state = await daemon_state(store)
    assert (state.running(), state.last_event, state.pid) == (False, "DaemonStopped", 4242)


async def test_telemetry_is_pruned_after_the_retention_window(store: EventStore) -> None:
    now = time.time()
    for age in (500, 200, 100, 10):
        await record_telemetry(
            store,
            {"device": "cpu", "at": now - age, "allocated": age, "unknown_key": 1},
            retention_s=1000,
        )
    # The window ends at the newest sample, so a stopped daemon's last minutes stay visible.
    samples = await recent_telemetry(store, seconds=290)
    assert [s.allocated for s in samples] == [200, 100, 10]
    await record_telemetry(store, {"device": "cpu", "at": now, "rss": 7}, retention_s=150)
    samples = await recent_telemetry(store, seconds=3600)
    assert [(s.allocated, s.rss) for s in samples] == [(100, None), (10, None), (None, 7)]


async def test_drops_and_artifacts(store: EventStore) -> None:
    common = {"kind": "dataset", "source": "drop/datasets/x", "stored": "drop/processed/x"}
    await store.append(
        drop_stream("d1"),
        [ev.Dropped(drop_id="d1", name="x", hash="h1", files=2, bytes=9, **common)],
    )
    await store.append(
        drop_stream("d2"),
        [ev.DropRecognised(drop_id="d2", name="x2", hash="h1", duplicate_of="d1", **common)],
    )
    found = await drop_by_hash(store, "dataset", "h1")
    assert found is not None and found["id"] == "d1"
    assert await drop_by_hash(store, "prompts", "h1") is None
    assert {d["id"] for d in await list_drops(store)} == {"d1", "d2"}
    await store.append(
        job_stream("a"),
        [
            submitted("a"),
            ev.ArtifactWritten(path="b.png", kind="image"),
            ev.ArtifactWritten(path="a.png", kind="image"),
        ],
    )
    assert [a["path"] for a in await job_artifacts(store, "a")] == ["b.png", "a.png"]


async def test_device_rooms_are_each_executors_newest_fresh_sample(store: EventStore) -> None:
    from dropkiln.store.telemetry import device_rooms

    now = time.time()
    samples = [
        {"executor": "a/cuda:0", "device": "cuda:0", "free": 1, "at": now - 3},
        {"executor": "a/cuda:0", "device": "cuda:0", "free": 2, "at": now - 1},  # newest of a
        {"executor": "a/cuda:1", "device": "cuda:1", "free": 9, "at": now - 30},  # stale
        {"executor": "b/cuda:0", "device": "cuda:0", "free": 5, "at": now, "device_class": "24gb"},
        {"device": "cuda:0", "free": 7, "at": now},  # written before samples named executors
    ]
    for sample in samples:
        await record_telemetry(store, sample, retention_s=600)
    rooms = {r.executor: (r.free, r.device_class) for r in await device_rooms(store, 10.0)}
    assert rooms == {"a/cuda:0": (2, None), "b/cuda:0": (5, "24gb")}
