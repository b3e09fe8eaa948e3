"""Hypothesis strategies for event histories: valid lifecycles over several jobs and drops."""

from __future__ import annotations

from hypothesis import strategies as st

from dropkiln.store import events as ev
from dropkiln.store.events import DAEMON_STREAM, drop_stream, job_stream

from .builders import submitted

History = list[tuple[str, list[ev.Event]]]
"""Appends in order: each is one stream and the events appended to it together."""

PATHS = ("out/manifest.json", "out/a.png", "out/b.png")
RUNNING_MOVES = (
    *("progress", "checkpoint", "artifact", "request", "oom", "preempt"),
    *("interrupt", "succeed", "fail", "cancel"),
)
DAEMON_EVENTS = (ev.QueuePaused(), ev.QueueResumed(), ev.DaemonStopping(reason="x"))


@st.composite
def job_lifecycle(draw: st.DrawFn, job_id: str, earlier: list[str]) -> list[ev.Event]:
    """One job from JobSubmitted through a random but valid walk of its states."""
    deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2)) if earlier else []
    rung = draw(st.integers(0, 2))
    events: list[ev.Event] = [
        submitted(
            job_id,
            depends_on=deps,
            priority=draw(st.integers(0, 3)),
            rung_key=draw(st.sampled_from([None, "tiny/train/64", "tiny/generate/64"])),
            memory_rung=rung,
        ),
        ev.JobQueued(),
    ]
    state, attempt = "queued", 0
    for _ in range(draw(st.integers(0, 14))):
        if state == "queued":
            move = draw(st.sampled_from(["start", "start", "cancel"]))
            if move == "start":
                attempt += 1
                events.append(ev.JobStarted(attempt=attempt, memory_rung=rung))
                state = "running"
            else:
                events += [ev.CancelRequested(), ev.JobCancelled()]
                state = "cancelled"
        elif state == "running":
            move = draw(st.sampled_from(RUNNING_MOVES))
            if move == "progress":
                done = draw(st.integers(0, 100))
                metrics = draw(st.dictionaries(st.sampled_from(["loss", "lr"]), st.floats(0, 1)))
                events.append(ev.JobProgress(done=done, total=100, metrics=metrics))
            elif move == "checkpoint":
                events.append(ev.CheckpointSaved(state={"step": draw(st.integers(0, 9))}))
            elif move == "artifact":
                events.append(
                    ev.ArtifactWritten(
                        path=draw(st.sampled_from(PATHS)),
                        kind=draw(st.sampled_from(["image", "manifest"])),
                        bytes=draw(st.none() | st.integers(0, 10**9)),
                    )
                )
            elif move == "request":
                events.append(draw(st.sampled_from([ev.CancelRequested(), ev.RetryRequested()])))
            elif move == "oom":
                events.append(
                    ev.OutOfMemory(memory_rung=rung, rung_name="r", snapshot={}, message="oom")
                )
                rung += 1
                events.append(ev.RetryScheduled(next_rung=rung, rung_name="r"))
                state = "queued"
            elif move == "preempt":
                events.append(ev.JobPreempted(by="other"))
                state = "queued"
            elif move == "interrupt":
                events.append(ev.JobInterrupted(previous_attempt=attempt))
                state = "queued"
            elif move == "succeed":
                events.append(ev.JobSucceeded(result={"attempt": attempt}))
                state = "succeeded"
            elif move == "fail":
                events.append(ev.JobFailed(reason=draw(st.text(max_size=20))))
                state = "failed"
            else:
                events.append(ev.JobCancelled())
                state = "cancelled"
        elif state in ("failed", "cancelled"):
            events += [ev.RetryRequested(), ev.JobQueued(reason="retry")]
            state = "queued"
        else:
            break
    return events


@st.composite
def drop_events(draw: st.DrawFn, drop_id: str) -> list[ev.Event]:
    common = {
        "drop_id": drop_id,
        "kind": draw(st.sampled_from(["dataset", "prompts"])),
        "name": f"drop-{drop_id}",
        "source": f"drop/{drop_id}",
        "stored": f"drop/processed/{drop_id}",
    }
    content = draw(st.sampled_from(["h1", "h2"]))
    event = draw(
        st.sampled_from(
            [
                ev.Dropped(**common, hash=content, files=1, bytes=10),
                ev.DropRejected(**common, reason="not an image"),
                ev.DropRecognised(**common, hash=content, duplicate_of="d0"),
            ]
        )
    )
    return [event]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Several jobs, drops and daemon events, their streams interleaved at random."""
    streams: dict[str, list[ev.Event]] = {}
    job_ids: list[str] = []
    for index in range(draw(st.integers(1, 4))):
        job_id = f"j{index}"
        streams[job_stream(job_id)] = draw(job_lifecycle(job_id, list(job_ids)))
        job_ids.append(job_id)
    for index in range(draw(st.integers(0, 2))):
        streams[drop_stream(f"d{index}")] = draw(drop_events(f"d{index}"))
    streams[DAEMON_STREAM] = draw(
        st.lists(
            st.sampled_from([ev.QueuePaused(), ev.QueueResumed(), ev.DaemonStopping(reason="x")]),
            max_size=3,
        )
    )
    names = sorted(streams)
    history: History = []
    for pick, size in draw(st.lists(st.tuples(st.sampled_from(names), st.integers(1, 3)))):
        chunk, streams[pick] = streams[pick][:size], streams[pick][size:]
        if chunk:
            history.append((pick, chunk))
    history += [(name, rest) for name, rest in streams.items() if rest]
    return history
