"""Outputs: artifacts by id (never by a client's path) and the trained LoRAs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from dropkiln.api.errors import ApiError
from dropkiln.api.jobs import artifact_json
from dropkiln.api.state import State
from dropkiln.store import artifact_by_seq, trained_loras

router = APIRouter(prefix="/v1", tags=["outputs"])

MEDIA_TYPES = {
    ".png": "image/png",
    ".mp4": "video/mp4",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".safetensors": "application/octet-stream",
    ".csv": "text/csv",
    ".json": "application/json",
}


@router.get(
    "/artifacts/{artifact_id}",
    summary="Download an output by its artifact id",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download(
    state: State,
    artifact_id: int = PathParam(ge=1, le=2**62, description="the `id` of an artifact"),
) -> FileResponse:
    """The file an ``ArtifactWritten`` event recorded. ``Range`` requests are answered with
    206 and the bytes asked for, so a video can be streamed and seeked."""
    row = await artifact_by_seq(state.store, artifact_id)
    if row is None:
        raise ApiError("artifact_not_found", f"no artifact {artifact_id}")
    path = Path(row["path"])
    root = state.settings.root.resolve()
    # The path was written by the daemon, but is still checked: only files under ROOT.
    resolved = await anyio.to_thread.run_sync(path.resolve)
    if not resolved.is_relative_to(root) or not await anyio.to_thread.run_sync(resolved.is_file):
        raise ApiError("artifact_missing", f"artifact {artifact_id} ({path.name}) is not on disk")
    return FileResponse(
        resolved,
        media_type=MEDIA_TYPES.get(resolved.suffix.lower(), "application/octet-stream"),
        filename=resolved.name,
        content_disposition_type="inline",
    )


def _metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``ss_*``, ``modelspec.*``), tensors unread."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors' own error type derives from Exception only
        return {"error": f"cannot read: {exc}"}


@router.get("/loras", summary="The trained LoRAs with their metadata")
async def loras(
    state: State, limit: int = Query(100, ge=1, le=10_000, description="newest first")
) -> dict[str, Any]:
    """One entry per finished training: its name (what a prompt file's ``loras`` names),
    the kohya-format file to download, and the ``ss_*`` metadata kohya, ComfyUI and A1111
    read."""
    found = []
    root = state.settings.root
    for job, artifacts in await trained_loras(state.store, limit=limit):
        kohya = next((a for a in artifacts if a["kind"] == "lora"), None)
        metadata: dict[str, str] = {}
        if kohya is not None and Path(kohya["path"]).is_file():
            metadata = await anyio.to_thread.run_sync(_metadata, Path(kohya["path"]))
        found.append(
            {
                "name": job.name,
                "job_id": job.id,
                "finished_at": job.finished_at,
                "model": (job.result or {}).get("model"),
                "steps": (job.result or {}).get("steps"),
                "rank": (job.result or {}).get("rank"),
                "file": artifact_json(kohya, root) if kohya else None,
                "artifacts": [artifact_json(a, root) for a in artifacts],
                "metadata": metadata,
            }
        )
    return {"loras": found}
