"""Every event type changes the jobs, drops and artifacts rows as the projections say."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dropkiln.store import EventStore, StoredEvent
from dropkiln.store import events as ev
from dropkiln.store.events import DAEMON_STREAM, EVENT_TYPES, drop_stream, job_stream
from dropkiln.store.schema import PROJECTIONS
from dropkiln.store.sqlite import Connection

from .builders import submitted

JOB = "j1"
STREAM = job_stream(JOB)
STARTED = [ev.JobQueued(), ev.JobStarted(attempt=1, memory_rung=0)]

Expect = Callable[[StoredEvent], dict[str, Any]]


async def projection_rows(store: EventStore) -> dict[str, list[dict[str, Any]]]:
    def work(conn: Connection) -> dict[str, list[dict[str, Any]]]:
        return {
            t.name: [dict(r) for r in conn.execute(f"SELECT * FROM {t.name}")] for t in PROJECTIONS
        }

    return await store.snapshot(work)


async def job_row(store: EventStore, job_id: str = JOB) -> dict[str, Any]:
    query = "SELECT * FROM jobs WHERE id = :id"
    return await store.snapshot(lambda conn: dict(conn.execute(query, {"id": job_id}).fetchone()))


# (events before, the event, the columns it must set). Every job event also sets version
# and updated_at from itself.
JOB_CASES: dict[str, tuple[list[ev.Event], ev.Event, Expect]] = {
    "JobQueued": (
        [*STARTED, ev.RetryRequested(), ev.JobFailed(reason="bad caption")],
        ev.JobQueued(reason="retry"),
        lambda e: {"state": "queued", "error": None, "finished_at": None, "requested": None},
    ),
    "JobClaimed": (
        [ev.JobQueued()],
        ev.JobClaimed(executor="box/cuda:1", attempt=1, lease_until=1.5e9, pid=7),
        lambda e: {"state": "queued", "executor": "box/cuda:1"},
    ),
    "JobStarted": (
        [ev.JobQueued()],
        ev.JobStarted(attempt=2, memory_rung=1, rung_name="slicing"),
        lambda e: {"state": "running", "attempt": 2, "memory_rung": 1, "started_at": e.at},
    ),
    "JobProgress": (
        STARTED,
        ev.JobProgress(done=3, total=10, metrics={"loss": 0.25}),
        lambda e: {"done": 3, "total": 10, "metrics": {"loss": 0.25}, "state": "running"},
    ),
    "CheckpointSaved": (
        STARTED,
        ev.CheckpointSaved(state={"step": 250, "files": ["lora.safetensors"]}),
        lambda e: {"checkpoint": {"step": 250, "files": ["lora.safetensors"]}},
    ),
    "CheckpointUnusable": (
        STARTED,
        ev.CheckpointUnusable(
            checkpoint="checkpoints/step-0000004", reason="truncated", resumed_from_step=2
        ),
        lambda e: {"state": "running"},  # a fact about the attempt: the job row keeps its state
    ),
    "ArtifactWritten": (
        STARTED,
        ev.ArtifactWritten(path="outputs/manifest.json", kind="manifest", bytes=12),
        lambda e: {"state": "running"},
    ),
    "JobSucceeded": (
        [*STARTED, ev.CancelRequested()],
        ev.JobSucceeded(result={"manifest": "outputs/manifest.json"}),
        lambda e: {
            "state": "succeeded",
            "result": {"manifest": "outputs/manifest.json"},
            "finished_at": e.at,
            "requested": None,
        },
    ),
    "JobFailed": (
        [*STARTED, ev.CancelRequested()],
        ev.JobFailed(reason="no usable image"),
        lambda e: {
            "state": "failed",
            "error": "no usable image",
            "finished_at": e.at,
            "requested": None,
        },
    ),
    "JobCancelled": (
        [*STARTED, ev.CancelRequested()],
        ev.JobCancelled(),
        lambda e: {
            "state": "cancelled",
            "error": "cancelled by request",
            "finished_at": e.at,
            "requested": None,
        },
    ),
    "OutOfMemory": (
        STARTED,
        ev.OutOfMemory(memory_rung=0, rung_name="default", snapshot={"peak": 1}, message="oom"),
        lambda e: {"state": "queued", "memory_rung": 0},
    ),
    "RetryScheduled": (
        [*STARTED, ev.OutOfMemory(memory_rung=0, rung_name="default", snapshot={}, message="")],
        ev.RetryScheduled(next_rung=2, rung_name="tiling", resume_from={"step": 3}),
        lambda e: {"state": "queued", "memory_rung": 2},
    ),
    "JobPreempted": (STARTED, ev.JobPreempted(by="j2"), lambda e: {"state": "queued"}),
    "JobInterrupted": (
        STARTED,
        ev.JobInterrupted(previous_attempt=1),
        lambda e: {"state": "queued", "attempt": 1},
    ),
    "CancelRequested": (STARTED, ev.CancelRequested(), lambda e: {"requested": "cancel"}),
    "RetryRequested": (
        [*STARTED, ev.JobFailed(reason="x")],
        ev.RetryRequested(by="tui"),
        lambda e: {"requested": "retry", "state": "failed"},
    ),
}

DROP_CASES: dict[str, tuple[ev.Event, dict[str, Any]]] = {
    "Dropped": (
        ev.Dropped(
            drop_id="d1",
            kind="dataset",
            name="cats",
            source="drop/datasets/cats",
            stored="drop/processed/cats",
            hash="abc",
            files=3,
            bytes=100,
        ),
        {"state": "ingested", "hash": "abc", "stored": "drop/processed/cats", "reason": None},
    ),
    "DropRejected": (
        ev.DropRejected(
            drop_id="d1",
            kind="prompts",
            name="p.toml",
            source="drop/prompts/p.toml",
            stored="drop/failed/p.toml",
            reason="unknown key 'stepz'",
        ),
        {"state": "failed", "reason": "unknown key 'stepz'", "hash": None},
    ),
    "DropRecognised": (
        ev.DropRecognised(
            drop_id="d1",
            kind="dataset",
            name="cats2",
            source="drop/datasets/cats2",
            stored="drop/processed/cats2",
            hash="abc",
            duplicate_of="d0",
        ),
        {"state": "duplicate", "duplicate_of": "d0", "hash": "abc"},
    ),
}

NO_PROJECTION: dict[str, ev.Event] = {
    "DaemonStarted": ev.DaemonStarted(pid=1, host="h", version="0", device="cpu", root="/r"),
    "DaemonStopping": ev.DaemonStopping(reason="SIGTERM"),
    "DaemonStopped": ev.DaemonStopped(requeued=[JOB]),
    "QueuePaused": ev.QueuePaused(),
    "QueueResumed": ev.QueueResumed(),
    "DropMoved": ev.DropMoved(stored="drop/processed/d1-cats"),
    "DropMoveFailed": ev.DropMoveFailed(
        source="drop/datasets/cats",
        stored="drop/processed/d1-cats",
        reason="[Errno 13] Permission denied",
        attempt=1,
        retry_in_s=1.0,
    ),
    "DropMoveAbandoned": ev.DropMoveAbandoned(source="drop/datasets/cats", reason="gone"),
    "DropWaiting": ev.DropWaiting(source="drop/datasets/cats", reason="because", waiting_s=60),
    "ApiAuthFailed": ev.ApiAuthFailed(client="192.0.2.1", reason="wrong", path="/v1/jobs"),
    "WebhookAttemptFailed": ev.WebhookAttemptFailed(
        for_seq=3, job_id=JOB, attempt=1, error="HTTP 500", retry_in_s=2.0
    ),
    "WebhookDelivered": ev.WebhookDelivered(for_seq=3, job_id=JOB, attempt=2, status=200),
    "WebhookGaveUp": ev.WebhookGaveUp(for_seq=3, job_id=JOB, attempts=5, error="HTTP 500"),
}
# Streams of their own: the API's refusals, the webhook deliveries.
OWN_STREAM = {"ApiAuthFailed": ev.API_STREAM} | {
    name: ev.WEBHOOK_STREAM for name in NO_PROJECTION if name.startswith("Webhook")
}


def test_every_event_type_has_a_case() -> None:
    covered = {"JobSubmitted"} | JOB_CASES.keys() | DROP_CASES.keys() | NO_PROJECTION.keys()
    assert covered == EVENT_TYPES.keys()


async def test_job_submitted_inserts_a_queued_job(store: EventStore) -> None:
    event = submitted(
        JOB, priority=5, depends_on=["j0"], drop_id="d1", rung_key="tiny/train/64", memory_rung=2
    )
    [stored] = await store.append(STREAM, [event])
    row = await job_row(store)
    assert row == {
        "id": JOB,
        "stage": "bucket",
        "name": f"cats-{JOB}",
        "drop_id": "d1",
        "lane": "cpu",
        "priority": 5,
        "depends_on": ["j0"],
        "spec": {"dataset": f"/drop/{JOB}"},
        "rung_key": "tiny/train/64",
        "state": "queued",
        "attempt": 0,
        "memory_rung": 2,
        "done": 0,
        "total": 0,
        "metrics": {},
        "checkpoint": None,
        "result": None,
        "error": None,
        "requested": None,
        "executor": None,
        "device_class": None,
        "submitted_seq": stored.seq,
        "version": 1,
        "created_at": stored.at,
        "started_at": None,
        "finished_at": None,
        "updated_at": stored.at,
    }


@pytest.mark.parametrize("type_name", sorted(JOB_CASES))
async def test_job_event_updates_the_job_row(store: EventStore, type_name: str) -> None:
    before, event, expect = JOB_CASES[type_name]
    assert event.type_name() == type_name
    await store.append(STREAM, [submitted(JOB), *before])
    earlier = await job_row(store)
    [stored] = await store.append(STREAM, [event])
    row = await job_row(store)
    want = {**expect(stored), "version": stored.version, "updated_at": stored.at}
    assert {k: row[k] for k in want} == want
    untouched = set(row) - set(want)
    assert {k: row[k] for k in untouched} == {k: earlier[k] for k in untouched}


@pytest.mark.parametrize("type_name", sorted(DROP_CASES))
async def test_drop_event_inserts_a_drop_row(store: EventStore, type_name: str) -> None:
    event, want = DROP_CASES[type_name]
    [stored] = await store.append(drop_stream("d1"), [event])
    rows = (await projection_rows(store))["drops"]
    assert len(rows) == 1
    data = stored.data
    assert rows[0]["id"] == "d1"
    assert rows[0]["kind"] == data["kind"]
    assert rows[0]["name"] == data["name"]
    assert rows[0]["source"] == data["source"]
    assert rows[0]["at"] == stored.at
    assert {k: rows[0][k] for k in want} == want


@pytest.mark.parametrize("type_name", sorted(NO_PROJECTION))
async def test_daemon_and_queue_events_leave_projections_alone(
    store: EventStore, type_name: str
) -> None:
    await store.append(STREAM, [submitted(JOB), *STARTED])
    before = await projection_rows(store)
    stream = OWN_STREAM.get(type_name, DAEMON_STREAM)
    await store.append(stream, [NO_PROJECTION[type_name]])
    assert await projection_rows(store) == before


async def test_artifact_written_twice_to_one_path_upserts(store: EventStore) -> None:
    await store.append(STREAM, [submitted(JOB), *STARTED])
    first = ev.ArtifactWritten(path="out/a.png", kind="preview", bytes=1, sha256="11")
    other = ev.ArtifactWritten(path="out/b.png", kind="image", bytes=2, sha256="22")
    again = ev.ArtifactWritten(path="out/a.png", kind="image", bytes=3, sha256="33")
    stored = await store.append(STREAM, [first, other, again])
    rows = sorted((await projection_rows(store))["artifacts"], key=lambda r: r["path"])
    assert rows == [
        {
            "job_id": JOB,
            "path": "out/a.png",
            "seq": stored[2].seq,
            "kind": "image",
            "bytes": 3,
            "sha256": "33",
            "at": stored[2].at,
        },
        {
            "job_id": JOB,
            "path": "out/b.png",
            "seq": stored[1].seq,
            "kind": "image",
            "bytes": 2,
            "sha256": "22",
            "at": stored[1].at,
        },
    ]
    assert (await job_row(store))["version"] == stored[2].version


async def test_same_path_in_two_jobs_is_two_artifacts(store: EventStore) -> None:
    for job_id in ("a", "b"):
        await store.append(
            job_stream(job_id),
            [submitted(job_id), ev.ArtifactWritten(path="out/x.png", kind="image")],
        )
    rows = (await projection_rows(store))["artifacts"]
    assert sorted(r["job_id"] for r in rows) == ["a", "b"]


def test_every_event_class_says_what_it_does_to_the_projections() -> None:
    from dropkiln.store.projections import NO_PROJECTION, PROJECTORS

    classes = set(EVENT_TYPES.values())
    assert PROJECTORS.keys() | NO_PROJECTION == classes
    assert not PROJECTORS.keys() & NO_PROJECTION


async def test_a_renamed_event_class_still_projects(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Renaming JobSucceeded (its stored type is its class name) must not leave the job
    # running with only its version bumped: the projection follows the class, not a string.
    await store.append(STREAM, [submitted(JOB), *STARTED])
    monkeypatch.setitem(EVENT_TYPES, "JobCompleted", ev.JobSucceeded)
    ev.JobSucceeded.__name__ = "JobCompleted"
    try:
        await store.append(STREAM, [ev.JobSucceeded(result={"manifest": "m.json"})])
    finally:
        ev.JobSucceeded.__name__ = "JobSucceeded"
    row = await job_row(store)
    assert (row["state"], row["result"]) == ("succeeded", {"manifest": "m.json"})


def test_an_event_without_a_projection_rule_is_refused() -> None:
    from dropkiln.store.projections import changes_for

    class JobRenamedByMistake(ev.Event):
        pass

    stored = StoredEvent(1, STREAM, 2, "JobRenamedByMistake", {}, "2026-01-01T00:00:00+00:00")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(EVENT_TYPES, "JobRenamedByMistake", JobRenamedByMistake)
        with pytest.raises(ValueError, match="no projection rule"):
            changes_for(stored)


def test_endings_written_before_caused_by_existed_still_read() -> None:
    # Rows already in users' databases have no caused_by: they read as "ended on its own".
    from dropkiln.store.projections import changes_for

    for type_name in ("JobFailed", "JobCancelled"):
        old = StoredEvent(7, STREAM, 4, type_name, {"reason": "x"}, "2026-01-01T00:00:00+00:00")
        event = ev.parse_event(old.type, old.data)
        assert isinstance(event, ev.JobFailed | ev.JobCancelled) and event.caused_by is None
        assert changes_for(old)[0].values["error"] == "x"


def test_the_write_paths_tables_are_the_schemas() -> None:
    # Issue 16: the projections write SQL without importing SQLAlchemy (a command must answer
    # in a quarter of a second); what they know of the schema must be what schema.py makes.
    from sqlalchemy import JSON

    from dropkiln.store import projections, schema

    assert [t.name for t in projections.PROJECTIONS] == [t.name for t in schema.PROJECTIONS]
    for mine, table in zip(projections.PROJECTIONS, schema.PROJECTIONS, strict=True):
        json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
        assert mine.json_columns == json_columns, table.name


def test_a_plain_command_is_the_typed_command_event() -> None:
    # Issue 16: the CLI writes commands without loading pydantic; what it writes must be
    # exactly what the daemon reads back as the typed event, and project as it says.
    from dropkiln.store.commands import COMMANDS, Command, command_changes

    typed = {name for name, cls in EVENT_TYPES.items() if cls.command}
    assert set(COMMANDS.values()) == typed
    for type_name in typed:
        cls = EVENT_TYPES[type_name]
        plain = Command(type_name, "cli")
        assert plain.type_name() == cls.type_name()
        assert plain.durable == cls.durable
        data = plain.model_dump(mode="json")
        assert data == cls(by="cli").model_dump(mode="json")  # type: ignore[call-arg]
        assert ev.parse_event(type_name, data) == cls(by="cli")  # type: ignore[call-arg]
        stored = StoredEvent(9, STREAM, 3, type_name, data, "2026-01-01T00:00:00+00:00")
        changes = command_changes(stored)
        assert changes is not None
        requested = {"CancelRequested": "cancel", "RetryRequested": "retry"}.get(type_name)
        assert [c.values.get("requested") for c in changes] == ([requested] if requested else [])
    stored = StoredEvent(9, STREAM, 3, "JobQueued", {}, "2026-01-01T00:00:00+00:00")
    assert command_changes(stored) is None
