"""The bearer token: made by `dropkiln init`, kept in ``state/api-token`` (0600), rotatable.

Every endpoint but ``/healthz`` asks for it. The comparison takes the same time whatever the
guess; a client that fails too often is refused for a while, and each counted failure is an
``ApiAuthFailed`` event (who and where, never what was sent).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict, deque
from pathlib import Path

from fastapi import Request

from dropkiln.api.errors import ApiError
from dropkiln.api.token import read_token
from dropkiln.store import EventStore
from dropkiln.store.events import API_STREAM, ApiAuthFailed

log = logging.getLogger(__name__)

TRACKED_CLIENTS = 10_000  # failure records kept; the oldest client is forgotten first


class TokenFile:
    """The current token, re-read when the file changes: a rotation needs no restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._token: str | None = None

    def current(self) -> str | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        seen = (stat.st_ino, stat.st_mtime_ns)
        if seen != self._seen:
            self._token, self._seen = read_token(self.path), seen
        return self._token


class FailureLimiter:
    """At most ``limit`` counted failures per client in any ``window_s``; then refused."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str, now: float | None = None) -> float | None:
        """Seconds until this client may try again, or None if it may now."""
        now = time.monotonic() if now is None else now
        times = self._recent(client, now)
        if len(times) < self.limit:
            return None
        return max(times[0] + self.window_s - now, 0.0)

    def record(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self._failures.pop(client, None) or deque()
        times.append(now)
        self._failures[client] = times
        while len(self._failures) > TRACKED_CLIENTS:
            self._failures.popitem(last=False)


class BearerAuth:
    """A FastAPI dependency: the request carries the token, or it is refused."""

    def __init__(self, tokens: TokenFile, limiter: FailureLimiter, store: EventStore) -> None:
        self.tokens = tokens
        self.limiter = limiter
        self.store = store

    async def __call__(self, request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        wait = self.limiter.retry_after(client)
        if wait is not None:
            raise ApiError(
                "too_many_failures",
                f"too many failed attempts from {client}; try again in {wait:.0f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        reason = self._refusal(request.headers.get("authorization"))
        if reason is None:
            return
        self.limiter.record(client)
        log.warning("refused %s from %s: %s token", request.url.path, client, reason)
        failed = ApiAuthFailed(client=client, reason=reason, path=request.url.path[:200])
        await self.store.append(API_STREAM, [failed])
        raise ApiError(
            "unauthorized",
            "missing or wrong token: send 'Authorization: Bearer TOKEN' "
            "(the token is in ROOT/state/api-token)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _refusal(self, header: str | None) -> str | None:
        if not header:
            return "missing"
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "malformed"
        expected = self.tokens.current()
        # compare_digest takes the same time wherever the first difference is.
        if expected is None or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            return "wrong"
        return None
