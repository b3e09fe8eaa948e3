"""Request bodies streamed to disk: a size limit, a read timeout, and nothing left half-written.

A body over the limit is refused as soon as it says so (``Content-Length``) or as soon as
it passes the limit; a client that stops sending for ``read_timeout_s`` is cut off (a
slow-loris upload holds no worker forever). The caller writes into a staging folder it
removes whatever happens, so a refused upload leaves no partial file behind.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from dropkiln.api.errors import ApiError

# A plain file name: no folder, not hidden, no control characters, not too long.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+()\-]{0,119}")


def plain_name(name: str, what: str) -> str:
    """``name`` if it is a plain file name (so it can never leave its folder)."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ApiError(
            "bad_name",
            f"{what} {name!r} is not a plain file name (letters, digits, space and ._+()- "
            "only, no folders)",
        )
    return name


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    read_timeout_s: float


async def body_chunks(request: Request, limits: Limits) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise _too_large(limits)
    received = 0
    chunks = request.stream().__aiter__()
    while True:
        with anyio.move_on_after(limits.read_timeout_s) as waited:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
        if waited.cancelled_caught:
            raise ApiError(
                "upload_timeout",
                f"the upload stopped: nothing arrived for {limits.read_timeout_s:g} s "
                f"after {received:,} bytes",
            )
        received += len(chunk)
        if received > limits.max_bytes:
            raise _too_large(limits)
        yield chunk


def _too_large(limits: Limits) -> ApiError:
    limit = f"{limits.max_bytes:,}"
    return ApiError("upload_too_large", f"the upload is over the limit of {limit} bytes")


async def save_body(request: Request, target: Path, limits: Limits) -> int:
    """The whole raw body into the new file ``target``; returns its size."""
    size = 0
    with open(target, "xb") as sink:
        async for chunk in body_chunks(request, limits):
            sink.write(chunk)
            size += len(chunk)
    return size


Placer = Callable[[str, str | None], Path]
"""(form field, file name) → where that part goes; raises ApiError for a part not wanted."""


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    field: bytes = b""
    value: bytes = b""
    sink: IO[bytes] | None = None


async def save_multipart(request: Request, place: Placer, limits: Limits) -> dict[str, list[Path]]:
    """Every file part of a multipart/form-data body to where ``place`` says."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError("unsupported_media_type", "multipart/form-data without a boundary")
    saved: dict[str, list[Path]] = {}
    part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.value += data[start:end]

    def on_header_end() -> None:
        part.headers[part.field.decode("latin-1").lower()] = part.value.decode("utf-8", "replace")
        part.field = part.value = b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part.headers.get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        target = place(name, filename.decode("utf-8", "replace") if filename else None)
        part.sink = open(target, "xb")  # noqa: SIM115 - closed at the part's end
        saved.setdefault(name, []).append(target)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        assert part.sink is not None
        part.sink.write(data[start:end])

    def on_part_end() -> None:
        if part.sink is not None:
            part.sink.close()
        part.headers, part.sink = {}, None

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in body_chunks(request, limits):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError("invalid_request", f"malformed multipart body: {exc}") from exc
    finally:
        if part.sink is not None:
            part.sink.close()
    return saved
