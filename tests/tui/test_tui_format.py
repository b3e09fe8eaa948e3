"""Formatting and filter parsing: what a person reads in the dashboard."""

from __future__ import annotations

import pytest

from dropkiln.store import JobView, StoredEvent
from dropkiln.tui import format as fmt
from dropkiln.tui.reads import LogFilter, event_types_for


def stored(
    type_name: str, data: dict[str, object], stream: str = "job:abcdef123456"
) -> StoredEvent:
    return StoredEvent(7, stream, 3, type_name, data, "2025-03-01T12:00:05.000000+00:00")


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "0s"), (42.4, "42s"), (192, "3m12s"), (3840, "1h04m"), (183600, "2d03h"), (None, "—")],
)
def test_duration_keeps_two_units(seconds: float | None, expected: str) -> None:
    assert fmt.duration(seconds) == expected


@pytest.mark.parametrize(("seconds", "expected"), [(5, "5s"), (600, "10m"), (7300, "2h")])
def test_age_keeps_one_unit(seconds: float, expected: str) -> None:
    assert fmt.age(seconds) == expected


def test_sizes_pick_a_readable_unit() -> None:
    assert fmt.size(1.5 * 1024**3) == "1.5 GiB"
    assert fmt.size(20_480) == "20 KiB"
    assert fmt.size(None) == "—"


def test_bar_has_its_width_whatever_the_fraction() -> None:
    for fraction in (0.0, 0.01, 0.5, 0.999, 1.0, 1.7):
        assert fmt.bar(fraction, 10).cell_len == 10
    assert fmt.bar(0.5, 10).plain.startswith("█████")


def test_out_of_memory_line_stands_out_and_says_why() -> None:
    event = stored(
        "OutOfMemory",
        {"memory_rung": 1, "rung_name": "attention_slicing", "snapshot": {}, "message": "CUDA oom"},
    )
    line = fmt.event_line(event)
    assert line.plain == "12:00:05 job:abcdef12  OutOfMemory rung 1 attention_slicing: CUDA oom"
    styles = {str(span.style) for span in line.spans}
    assert fmt.EVENT_STYLES["OutOfMemory"] in styles
    assert fmt.EVENT_STYLES["JobFailed"] != fmt.EVENT_STYLES["JobProgress"]


def test_unknown_or_malformed_events_are_shown_raw() -> None:
    assert fmt.describe(stored("SomethingNew", {"x": 1})) == '{"x":1}'
    assert fmt.describe(stored("JobFailed", {"why": "?"})) == '{"why":"?"}'
    assert fmt.describe(stored("QueuePaused", {"by": "tui"}, stream="daemon")) == "by tui"


def test_event_types_accept_parts_of_names_and_aliases() -> None:
    assert event_types_for("oom, JobFailed") == ("OutOfMemory", "JobFailed")
    assert event_types_for("progress") == ("JobProgress",)
    assert event_types_for("") == ()
    with pytest.raises(ValueError, match="no event type matches 'nonsense'"):
        event_types_for("nonsense")


def test_log_filter_matches_job_and_type() -> None:
    event = stored("JobFailed", {"reason": "x"})
    assert LogFilter().matches(event)
    assert LogFilter(job_id="abcdef123456").matches(event)
    assert not LogFilter(job_id="other").matches(event)
    assert not LogFilter(types=("JobProgress",)).matches(event)
    assert (
        LogFilter(job_id="abcdef123456", types=("JobFailed",)).label() == "job abcdef12 · JobFailed"
    )


def test_event_types_can_be_left_out() -> None:
    everything_but_progress = event_types_for("-progress")
    assert "JobProgress" not in everything_but_progress and "JobFailed" in everything_but_progress
    assert LogFilter(types=everything_but_progress).label() == "all but JobProgress"
    lifecycle = ("JobQueued", "JobClaimed", "JobStarted")
    assert event_types_for("job, -progress, -submitted")[:3] == lifecycle
    with pytest.raises(ValueError, match="no event type matches '-'"):
        event_types_for("-")


def test_eta_falls_back_to_steps_left_at_the_last_speed() -> None:
    from dataclasses import replace

    job = _job(done=100, total=400, metrics={"it_s": 2.0})
    assert fmt.eta_seconds(job) == 150.0
    assert fmt.eta_seconds(replace(job, metrics={"it_s": 2.0, "eta_s": 9})) == 9
    assert fmt.eta_seconds(replace(job, metrics={})) is None


def test_results_and_artifact_paths_read_short() -> None:
    succeeded = stored("JobSucceeded", {"result": {"images": 2, "sheet": "/a/very/long/path/x.png",
                                                   "loras": [], "name": "cats"}})  # fmt: skip
    assert fmt.describe(succeeded) == "images=2 name=cats"
    artifact = stored("ArtifactWritten", {"path": "/srv/dk/outputs/a.png", "kind": "image"})
    assert fmt.describe(artifact, root="/srv/dk") == "image outputs/a.png"
    assert fmt.describe(artifact, root="/elsewhere") == "image /srv/dk/outputs/a.png"


def _job(**values: object) -> JobView:
    fields: dict[str, object] = {
        "id": "j1", "stage": "train", "name": "n", "lane": "gpu", "priority": 1,
        "state": "running", "attempt": 1, "memory_rung": 0, "done": 0, "total": 0,
        "metrics": {}, "depends_on": [], "spec": {}, "result": None, "checkpoint": None,
        "error": None, "requested": None, "drop_id": None, "rung_key": None,
        "submitted_seq": 1, "version": 1, "created_at": "2025-03-01T12:00:00+00:00",
        "started_at": None, "finished_at": None, "updated_at": "2025-03-01T12:00:00+00:00",
    }  # fmt: skip
    return JobView(**{**fields, **values})  # type: ignore[arg-type]


def test_api_and_webhook_events_read_as_sentences() -> None:
    failed = stored("ApiAuthFailed", {"client": "192.0.2.7", "reason": "wrong", "path": "/v1/jobs"})
    assert fmt.describe(failed) == "wrong token from 192.0.2.7 for /v1/jobs"
    attempt = {"for_seq": 41, "job_id": "a", "attempt": 1, "error": "HTTP 502", "retry_in_s": 2.0}
    assert fmt.describe(stored("WebhookAttemptFailed", attempt)) == (
        "#41 attempt 1: HTTP 502 · again in 2 s"
    )
    delivered = {"for_seq": 41, "job_id": "a", "attempt": 2, "status": 204}
    assert fmt.describe(stored("WebhookDelivered", delivered)) == "#41 HTTP 204 (attempt 2)"
