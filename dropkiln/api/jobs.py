"""Jobs, commands to the daemon, and the live event stream."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from dropkiln.api.errors import ApiError
from dropkiln.api.state import ApiState, State
from dropkiln.store import (
    JobView,
    StoreError,
    find_job,
    job_artifacts,
    request_command,
    status_report,
)
from dropkiln.store.events import job_stream

router = APIRouter(prefix="/v1", tags=["jobs"])

# Job ids are short hex; a prefix of one is accepted like the CLI's. Anything else (a path,
# a dot, a slash) is refused before it reaches a query.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
JobRef = Annotated[str, PathParam(description="a job id or an unambiguous prefix of one")]


def checked_id(value: str, what: str = "job id") -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ApiError("bad_id", f"{what} {value[:80]!r} has characters no id has")
    return value


async def job_by_ref(state: ApiState, ref: str) -> JobView:
    try:
        return await find_job(state.store, checked_id(ref))
    except StoreError as exc:
        code = "job_id_ambiguous" if "ambiguous" in str(exc) else "job_not_found"
        raise ApiError(code, str(exc)) from None


def artifact_json(row: dict[str, Any], root: Path) -> dict[str, Any]:
    path = Path(row["path"])
    shown = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return {
        "id": row["seq"],
        "job_id": row["job_id"],
        "kind": row["kind"],
        "path": shown,
        "bytes": row["bytes"],
        "sha256": row["sha256"],
        "at": row["at"],
        "url": f"/v1/artifacts/{row['seq']}",
    }


@router.get("/jobs", summary="The jobs, newest first (the shape of `status --json`)")
async def list_jobs(state: State, limit: int = Query(50, ge=1, le=100_000)) -> dict[str, Any]:
    return await status_report(state.store, limit=limit)


@router.get("/jobs/{job}", summary="One job: its summary, events, artifacts and error")
async def get_job(
    state: State,
    job: JobRef,
    since: int = Query(0, ge=0, description="only events after this seq"),
    limit: int = Query(1000, ge=1, le=10_000, description="at most this many events"),
) -> dict[str, Any]:
    found = await job_by_ref(state, job)
    events = await state.store.read(since, stream=job_stream(found.id), limit=limit)
    artifacts = await job_artifacts(state.store, found.id)
    root = state.settings.root
    return {
        "job": found.summary()
        | {"spec": found.spec, "result": found.result, "drop_id": found.drop_id},
        "error": found.error,
        "events": [event.as_json() for event in events],
        "more_events": len(events) == limit,
        "artifacts": [artifact_json(row, root) for row in artifacts],
    }


async def _command(state: ApiState, command: str, job: str | None) -> dict[str, Any]:
    target = await job_by_ref(state, job) if job is not None else None
    await request_command(state.store, command, target.id if target else None, by="api")
    return {"requested": command, "job": target.summary() if target else None}


@router.post("/jobs/{job}/cancel", status_code=202, summary="Cancel a job")
async def cancel(state: State, job: JobRef) -> dict[str, Any]:
    """A running job stops at its next check; a queued one never starts."""
    return await _command(state, "cancel", job)


@router.post("/jobs/{job}/retry", status_code=202, summary="Requeue a failed or cancelled job")
async def retry(state: State, job: JobRef) -> dict[str, Any]:
    return await _command(state, "retry", job)


@router.post("/queue/pause", status_code=202, summary="Stop starting new jobs")
async def pause(state: State) -> dict[str, Any]:
    return await _command(state, "pause", None)


@router.post("/queue/resume", status_code=202, summary="Start jobs again")
async def resume(state: State) -> dict[str, Any]:
    return await _command(state, "resume", None)


@router.get(
    "/events",
    summary="Server-Sent Events: the event log, live",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(
    state: State,
    job: str | None = Query(None, description="only this job's events (id or prefix)"),
    since: int | None = Query(None, ge=0, description="start after this seq (default: now)"),
    last_event_id: str | None = Header(None, description="resume after this seq"),
) -> StreamingResponse:
    """Each event is ``id: SEQ``, ``event: TYPE``, ``data: {seq, stream, version, type, at,
    data}``. Reconnect with ``Last-Event-ID`` (browsers do it themselves) to miss nothing."""
    stream = job_stream((await job_by_ref(state, job)).id) if job is not None else None
    if last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise ApiError("bad_id", f"Last-Event-ID {last_event_id[:40]!r} is not a seq")
        after = int(last_event_id)
    else:
        after = since if since is not None else await state.store.last_seq()
    source = state.hub.events(after, stream)

    async def body() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        async for item in source:
            if item is None:
                yield ": keep-alive\n\n"
            else:
                yield f"id: {item.seq}\nevent: {item.type}\ndata: {json.dumps(item.as_json())}\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
