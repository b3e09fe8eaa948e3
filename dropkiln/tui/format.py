"""How values read on screen: sizes, durations, progress bars, event lines and their colours."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from rich.text import Text

from dropkiln.store import JobView, StoredEvent
from dropkiln.store.vocabulary import JobState

STATE_STYLES: dict[str, str] = {
    JobState.QUEUED: "",
    JobState.WAITING: "dim",
    JobState.RUNNING: "bold cyan",
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "bold red",
    JobState.CANCELLED: "yellow",
}

# Failures and out-of-memory must stand out in a scrolling log; progress must not.
EVENT_STYLES = {
    "JobFailed": "bold white on dark_red",
    "OutOfMemory": "bold black on magenta",
    "DropRejected": "bold red",
    "RetryScheduled": "magenta",
    "JobCancelled": "yellow",
    "JobInterrupted": "yellow",
    "JobPreempted": "yellow",
    "JobSucceeded": "bold green",
    "JobStarted": "cyan",
    "JobProgress": "dim",
    "CheckpointSaved": "blue",
    "CheckpointUnusable": "bold yellow",
    "ArtifactWritten": "green",
    "DaemonStarted": "bold green",
    "DaemonStopping": "bold yellow",
    "DaemonStopped": "bold yellow",
    "CancelRequested": "bold blue",
    "RetryRequested": "bold blue",
    "QueuePaused": "bold blue",
    "QueueResumed": "bold blue",
    "ApiAuthFailed": "bold red",
    "WebhookAttemptFailed": "yellow",
    "WebhookGaveUp": "bold red",
}

BAR_EIGHTHS = " ▏▎▍▌▋▊▉"


def short_id(value: str, width: int = 8) -> str:
    return value[:width]


def unique_prefixes(ids: Iterable[str], minimum: int = 8) -> dict[str, str]:
    """Each id's shortest prefix (at least ``minimum`` long) that no other id here shares."""
    ordered = sorted(set(ids))
    prefixes: dict[str, str] = {}
    for index, value in enumerate(ordered):
        # In sorted order the longest shared prefix is with a neighbour.
        shared = 0
        for other in ordered[max(0, index - 1) : index] + ordered[index + 1 : index + 2]:
            common = 0
            while common < min(len(value), len(other)) and value[common] == other[common]:
                common += 1
            shared = max(shared, common)
        prefixes[value] = value[: max(minimum, shared + 1)]
    return prefixes


def short_stream(stream: str) -> str:
    """``job:<id>`` with the id cut to eight characters, so log columns line up."""
    kind, _, rest = stream.partition(":")
    return f"{kind}:{short_id(rest)}" if rest else stream


def parse_time(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def clock_time(iso: str) -> str:
    """Local wall-clock time of a stored UTC timestamp."""
    return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")


def duration(seconds: float | None) -> str:
    """Two significant units: ``42s``, ``3m12s``, ``1h04m``, ``2d03h``."""
    if seconds is None:
        return "—"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def age(seconds: float) -> str:
    """One unit, for narrow columns: ``42s``, ``12m``, ``3h``, ``5d``."""
    total = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if total >= size:
            return f"{total // size}{unit}"
    return f"{total}s"


def size(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}" if unit == "GiB" else f"{value / scale:.0f} {unit}"
    return f"{value:.0f} B"


def bar(fraction: float, width: int, style: str = "cyan", empty: str = "grey23") -> Text:
    """A bar with eighth-cell resolution."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = Text()
    text.append("█" * full, style=style)
    if full < width:
        text.append(BAR_EIGHTHS[part], style=f"{style} on {empty}")
        text.append(" " * (width - full - 1), style=f"on {empty}")
    return text


def progress_cell(job: JobView, width: int = 6) -> Text:
    if job.state in (JobState.QUEUED, JobState.WAITING) and not job.total:
        return Text("")
    style = STATE_STYLES.get(job.state) or "cyan"
    text = bar(job.progress, width, style=style)
    text.append(f" {job.progress * 100:3.0f}%", style=style)
    return text


def metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else None


def speed(job: JobView) -> str:
    it_s = metric(job.metrics, "it_s")
    return f"{it_s:.1f} it/s" if it_s is not None else ""


def eta_seconds(job: JobView) -> float | None:
    """The stage's own estimate, else the steps left at the last reported speed."""
    seconds = metric(job.metrics, "eta_s")
    if seconds is not None:
        return seconds
    it_s = metric(job.metrics, "it_s")
    if it_s and job.total and job.done < job.total:
        return (job.total - job.done) / it_s
    return None


def eta(job: JobView) -> str:
    seconds = eta_seconds(job)
    return f"ETA {duration(seconds)}" if seconds is not None else ""


def loss(job: JobView) -> str:
    value = metric(job.metrics, "loss")
    return f"loss {value:.4f}" if value is not None else ""


def steps(job: JobView) -> str:
    return f"{job.done}/{job.total}" if job.total else ""


def running_summary(job: JobView) -> str:
    """``120/2000 · 3.1 it/s · ETA 10m12s · loss 0.1234``, leaving out what is unknown."""
    return " · ".join(part for part in (steps(job), speed(job), eta(job), loss(job)) if part)


def state_text(job: JobView) -> Text:
    label: str = job.state
    if job.requested == "cancel" and not job.terminal:
        label = "cancelling"
    return Text(label, style=STATE_STYLES.get(job.state, ""))


def _job_started(d: dict[str, Any]) -> str:
    return f"attempt {d['attempt']} · rung {d['memory_rung']} {d.get('rung_name', '')}".rstrip()


def _progress(d: dict[str, Any]) -> str:
    metrics = d.get("metrics") or {}
    parts = [f"{d['done']}/{d['total']}"]
    for key, label in (("loss", "loss"), ("it_s", "it/s")):
        value = metric(metrics, key)
        if value is not None:
            parts.append(f"{label} {value:.4g}")
    return " ".join(parts)


def _result(result: dict[str, Any]) -> str:
    """The short facts of a result (counts, sizes, names); paths and lists are left out."""
    facts = [
        f"{key}={value}"
        for key, value in result.items()
        if isinstance(value, int | float | bool)
        or (isinstance(value, str) and len(value) <= 24 and "/" not in value)
    ]
    return " ".join(facts)


def under_root(path: str, root: str | None) -> str:
    """``path`` relative to the dropkiln ROOT when it lies under it."""
    if root:
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def _compact(d: dict[str, Any]) -> str:
    return json.dumps(d, separators=(",", ":"), default=str) if d else ""


DESCRIBERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "JobSubmitted": lambda d: (
        f"{d['stage']} {d['name']}"
        + (
            f" after {', '.join(short_id(x) for x in d['depends_on'])}"
            if d.get("depends_on")
            else ""
        )
    ),
    "JobQueued": lambda d: d.get("reason", ""),
    "JobStarted": _job_started,
    "JobProgress": _progress,
    "CheckpointSaved": lambda d: " ".join(
        f"{k} {v}" for k, v in d["state"].items() if isinstance(v, int | float | str)
    )[:80],
    "CheckpointUnusable": lambda d: (
        f"{d['checkpoint']}: {d['reason']}; went on from step {d['resumed_from_step']}"
    ),
    "ArtifactWritten": lambda d: f"{d['kind']} {d['path']}",
    "JobSucceeded": lambda d: _result(d.get("result") or {}),
    "JobFailed": lambda d: d["reason"],
    "JobCancelled": lambda d: d.get("reason", ""),
    "OutOfMemory": lambda d: f"rung {d['memory_rung']} {d['rung_name']}: {d['message']}",
    "RetryScheduled": lambda d: f"next rung {d['next_rung']} {d['rung_name']}",
    "JobPreempted": lambda d: f"by {d['by']}" if d.get("by") else "",
    "JobInterrupted": lambda d: f"attempt {d['previous_attempt']} died with the daemon",
    "DaemonStarted": lambda d: f"pid {d['pid']} on {d['host']} · {d['device']} · v{d['version']}",
    "DaemonStopping": lambda d: d.get("reason", ""),
    "DaemonStopped": lambda d: f"requeued {len(d.get('requeued') or [])}",
    "Dropped": lambda d: f"{d['kind']} {d['name']} · {d['files']} files",
    "DropRejected": lambda d: f"{d['kind']} {d['name']}: {d['reason']}",
    "DropRecognised": lambda d: f"{d['kind']} {d['name']} = {short_id(d['duplicate_of'])}",
    "DropMoved": lambda d: f"now at {d['stored']}",
    "DropMoveFailed": lambda d: (
        f"could not move {d['source']} (try {d['attempt']}): {d['reason']}; "
        f"again in {d['retry_in_s']:.0f} s"
    ),
    "DropMoveAbandoned": lambda d: f"{d['source']}: {d['reason']}",
    "DropWaiting": lambda d: f"waiting: {d['source']} {d['reason']}",
    "ApiAuthFailed": lambda d: f"{d['reason']} token from {d['client']} for {d['path']}",
    "WebhookAttemptFailed": lambda d: (
        f"#{d['for_seq']} attempt {d['attempt']}: {d['error']}"
        + (f" · again in {d['retry_in_s']:g} s" if d.get("retry_in_s") is not None else "")
    ),
    "WebhookDelivered": lambda d: f"#{d['for_seq']} HTTP {d['status']} (attempt {d['attempt']})",
    "WebhookGaveUp": lambda d: f"#{d['for_seq']} after {d['attempts']} attempts: {d['error']}",
}


def describe(event: StoredEvent, root: str | None = None) -> str:
    """What an event says, in one line; paths under ``root`` are shown relative to it."""
    describer = DESCRIBERS.get(event.type)
    if describer is None:
        if set(event.data) == {"by"}:
            return f"by {event.data['by']}"
        return _compact(event.data)
    data = event.data
    if event.type == "ArtifactWritten" and isinstance(data.get("path"), str):
        data = {**data, "path": under_root(data["path"], root)}
    try:
        return describer(data)
    except (KeyError, TypeError, ValueError):
        # An event written by another dropkiln version: show it raw rather than hide it.
        return _compact(event.data)


def event_line(event: StoredEvent, *, with_stream: bool = True, root: str | None = None) -> Text:
    """``12:03:04 job:1a2b3c4d JobProgress 120/2000 loss 0.12``, coloured by kind."""
    style = EVENT_STYLES.get(event.type, "")
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(clock_time(event.at), style="dim")
    line.append(" ")
    if with_stream:
        line.append(f"{short_stream(event.stream):<13}", style="dim" if style == "dim" else "")
        line.append(" ")
    line.append(event.type, style=style)
    summary = describe(event, root)
    if summary:
        line.append(" ")
        line.append(summary, style="dim" if style == "dim" else "")
    return line
