"""``POST /v1/datasets`` and ``POST /v1/prompts``: a drop, made over HTTP.

An upload is streamed into a hidden staging folder inside the drop folder (the watcher
ignores hidden names), checked by the planner's own code exactly as the daemon would check
it once dropped, and only then renamed into view with the same single rename as
`dropkiln submit`. What the daemon would reject is refused here with its reason (422) and
never reaches the drop folder; the staging folder is removed whatever happens.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request

from dropkiln.api.errors import ApiError
from dropkiln.api.receive import Limits, plain_name, save_body, save_multipart
from dropkiln.api.state import ApiState, State
from dropkiln.daemon.drops import DATASET, PROMPT_SUFFIXES, PROMPTS, DropRejection
from dropkiln.daemon.planner import check_drop
from dropkiln.store import drop_by_hash
from dropkiln.submit import drop_folder, reveal

router = APIRouter(prefix="/v1", tags=["drops"])

STAGING_PREFIX = ".api-"
STAGING_SUFFIX = ".upload"
PROMPT_TYPES = {
    "application/toml": ".toml",
    "text/toml": ".toml",
    "application/json": ".json",
    "text/plain": ".txt",
}


@contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A hidden folder beside the drops, removed on the way out (kept parts were renamed)."""
    path = folder / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{STAGING_SUFFIX}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_staging(folders: list[Path]) -> list[Path]:
    """Remove staging folders of API processes that no longer run (killed mid-upload)."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if not (name.startswith(STAGING_PREFIX) and name.endswith(STAGING_SUFFIX)):
                continue
            pid = name[len(STAGING_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _accept(state: ApiState, staged: Path, kind: str, code: str) -> dict[str, Any]:
    """Check a staged drop as the daemon would, then rename it into the drop folder."""
    try:
        parsed = await check_drop(state.settings, state.store, staged, kind)
    except DropRejection as exc:
        raise ApiError(code, str(exc)) from None
    duplicate = await drop_by_hash(state.store, kind, parsed.content_hash)
    target = drop_folder(state.settings, kind) / staged.name
    try:
        await anyio.to_thread.run_sync(reveal, staged, target)
    except FileExistsError as exc:
        raise ApiError("already_pending", str(exc)) from None
    return {
        "kind": kind,
        "name": parsed.name,
        "source": str(target),
        "files": parsed.files,
        "bytes": parsed.bytes,
        "hash": parsed.content_hash,
        "duplicate_of": duplicate["id"] if duplicate else None,
    }


@contextmanager
def _disk_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError("insufficient_storage", f"the server's disk is full: {exc}") from None
        raise


@router.post("/datasets", status_code=202, summary="Upload a dataset zip (a drop)")
async def upload_dataset(
    state: State,
    request: Request,
    name: str | None = Query(None, description="dataset name (default: the uploaded file's)"),
) -> dict[str, Any]:
    """A zip of images and captions: raw (``application/zip``) or multipart field ``file``.

    Accepted (202) once it is in the drop folder; follow it on ``/v1/events``
    (``Dropped`` with this ``source``, then the bucket, cache and train jobs).
    """
    limits = Limits(state.settings.api.max_upload_bytes, state.settings.api.read_timeout_s)
    folder = drop_folder(state.settings, DATASET)
    chosen = plain_name(name.removesuffix(".zip"), "dataset name") if name else None
    with staging(folder) as stage, _disk_errors():
        if _media_type(request) == "multipart/form-data":

            def place(field: str, filename: str | None) -> Path:
                if field != "file" or not filename or any(stage.iterdir()):
                    raise ApiError("invalid_request", "send one form field 'file': the zip")
                stem = chosen or plain_name(filename, "file name").removesuffix(".zip")
                return stage / f"{stem}.zip"

            saved = await save_multipart(request, place, limits)
            if not saved.get("file"):
                raise ApiError("invalid_request", "no 'file' field with the zip")
            staged = saved["file"][0]
        else:
            if chosen is None:
                raise ApiError("invalid_request", "give the dataset a name: ?name=NAME")
            staged = stage / f"{chosen}.zip"
            await save_body(request, staged, limits)
        return await _accept(state, staged, DATASET, "invalid_dataset")


@router.post("/prompts", status_code=202, summary="Upload a prompt file (a drop)")
async def upload_prompts(
    state: State,
    request: Request,
    name: str | None = Query(None, description="output name (default: the uploaded file's)"),
) -> dict[str, Any]:
    """A TOML/JSON/text prompt file as the body (``application/toml``, ``application/json``,
    ``text/plain``), or multipart: field ``file`` (the prompt file) and any number of
    ``images`` (control and reference images the file names). Validated first: a file the
    daemon would reject gets 422 with the same message as its ``.error.txt``.
    """
    limits = Limits(state.settings.api.max_prompt_upload_bytes, state.settings.api.read_timeout_s)
    folder = drop_folder(state.settings, PROMPTS)
    chosen = plain_name(name, "prompt file name") if name else None
    media = _media_type(request)
    with staging(folder) as stage, _disk_errors():
        if media == "multipart/form-data":
            return await _prompt_folder(request, state, stage, chosen, limits)
        suffix = PROMPT_TYPES.get(media)
        if suffix is None:
            raise ApiError(
                "unsupported_media_type",
                f"{media or 'no content type'}: send application/toml, application/json, "
                "text/plain or multipart/form-data",
            )
        stem = chosen or "prompts"
        staged = stage / (stem if stem.lower().endswith(PROMPT_SUFFIXES) else stem + suffix)
        await save_body(request, staged, limits)
        return await _accept(state, staged, PROMPTS, "invalid_prompt_file")


async def _prompt_folder(
    request: Request, state: ApiState, stage: Path, chosen: str | None, limits: Limits
) -> dict[str, Any]:
    """A prompt file with its images: dropped as one folder, as the daemon expects."""
    parts = stage / "parts"
    parts.mkdir()

    def place(field: str, filename: str | None) -> Path:
        if field not in ("file", "images") or not filename:
            raise ApiError("invalid_request", f"unexpected form field {field!r}")
        target = parts / plain_name(filename, "file name")
        if target.exists():
            raise ApiError("bad_name", f"two uploaded files are named {filename!r}")
        return target

    saved = await save_multipart(request, place, limits)
    prompt_files = saved.get("file", [])
    if len(prompt_files) != 1 or not prompt_files[0].name.lower().endswith(PROMPT_SUFFIXES):
        raise ApiError(
            "invalid_request", "send exactly one 'file' field: the .toml, .json or .txt prompt file"
        )
    stem = chosen or prompt_files[0].name.rsplit(".", 1)[0]
    staged = stage / plain_name(stem, "prompt folder name")
    os.rename(parts, staged)
    return await _accept(state, staged, PROMPTS, "invalid_prompt_file")
