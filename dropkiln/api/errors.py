"""Every error the API returns is ``{"error": {"code": …, "message": …}}`` with a stable code."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# Codes clients may rely on; the message is for people and may change.
CODES = {
    "unauthorized": 401,  # no token, a malformed header or the wrong token
    "too_many_failures": 429,  # this client failed to authenticate too often; wait
    "not_found": 404,  # no such route
    "method_not_allowed": 405,
    "invalid_request": 422,  # a parameter or body that does not fit the schema
    "bad_id": 400,  # an id with characters no id has (a path, say)
    "bad_name": 400,  # an upload name that is not a plain file name
    "job_not_found": 404,
    "job_id_ambiguous": 409,  # a prefix that matches several jobs
    "artifact_not_found": 404,
    "artifact_missing": 410,  # recorded, but the file is gone from disk
    "upload_too_large": 413,
    "upload_timeout": 408,  # the client stopped sending part-way
    "unsupported_media_type": 415,
    "invalid_dataset": 422,  # what the daemon would reject, with its reason
    "invalid_prompt_file": 422,
    "already_pending": 409,  # a drop by that name waits in the drop folder
    "too_many_streams": 503,
    "insufficient_storage": 507,
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = CODES[code]
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers)

    async def invalid(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
