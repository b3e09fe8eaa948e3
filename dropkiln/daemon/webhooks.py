"""Webhooks: a URL called when a job succeeds or fails, with an HMAC-SHA256-signed JSON body.

A task of the daemon's task group tails the log for ``JobSucceeded``/``JobFailed`` and posts
each to ``[webhooks] url``, one at a time in log order. A failed attempt (a connection error,
a timeout, a status that is not 2xx) is retried after ``backoff_s``, doubling, up to
``attempts`` times; every failed attempt, the delivery or the giving up is an event on the
``webhooks`` stream. The next start resumes after the last event recorded there, so a
restart neither loses a delivery nor sends one twice (a kill mid-request may repeat that one
request: receivers should treat ``X-Dropkiln-Delivery`` as idempotency key). The GPU work
and the rest of the loop never wait for a receiver.

The signature is ``X-Dropkiln-Signature: sha256=HEX``, HEX = HMAC-SHA256(secret, raw body).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import anyio
import httpx

from dropkiln import __version__
from dropkiln.config import WebhookSettings
from dropkiln.store import EventStore, StoredEvent, StoreError, find_job
from dropkiln.store.events import (
    WEBHOOK_STREAM,
    WebhookAttemptFailed,
    WebhookDelivered,
    WebhookGaveUp,
)

log = logging.getLogger(__name__)

NOTIFIED = ("JobSucceeded", "JobFailed")
RECORDS = ("WebhookDelivered", "WebhookGaveUp")


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(self, settings: WebhookSettings, store: EventStore) -> None:
        self.settings = settings
        self.store = store

    async def resume_point(self) -> int:
        """The seq after which events are still to be sent."""
        last = await self.store.last(WEBHOOK_STREAM, types=RECORDS)
        if last:
            return int(last[0].data["for_seq"])
        # Never sent before: start with what happens from now on, not the whole history.
        return await self.store.last_seq()

    async def run(self, after: int | None = None, poll_interval: float = 1.0) -> None:
        """Deliver forever (a task of the daemon's task group)."""
        start = await self.resume_point() if after is None else after
        async with httpx.AsyncClient(timeout=self.settings.timeout_s) as client:
            async for event in self.store.tail(start, poll_interval=poll_interval, types=NOTIFIED):
                try:
                    await self.deliver(client, event)
                except Exception:
                    # A bug here must not stop the daemon; the event is recorded as given up.
                    log.exception("webhook for event %d", event.seq)

    async def body(self, event: StoredEvent) -> bytes:
        job: dict[str, Any] | None = None
        if event.job_id is not None:
            try:
                job = (await find_job(self.store, event.job_id)).summary()
            except StoreError:
                job = None
        document = {"event": event.as_json(), "job": job}
        return json.dumps(document, separators=(",", ":")).encode()

    async def deliver(self, client: httpx.AsyncClient, event: StoredEvent) -> None:
        body = await self.body(event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"dropkiln/{__version__}",
            "X-Dropkiln-Event": event.type,
            "X-Dropkiln-Delivery": str(event.seq),
            "X-Dropkiln-Signature": signature(self.settings.secret, body),
        }
        delay = self.settings.backoff_s
        error = ""
        for attempt in range(1, self.settings.attempts + 1):
            try:
                response = await client.post(self.settings.url, content=body, headers=headers)
                if response.is_success:
                    delivered = WebhookDelivered(
                        for_seq=event.seq,
                        job_id=event.job_id,
                        attempt=attempt,
                        status=response.status_code,
                    )
                    await self.store.append(WEBHOOK_STREAM, [delivered])
                    return
                error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            last = attempt == self.settings.attempts
            failed = WebhookAttemptFailed(
                for_seq=event.seq,
                job_id=event.job_id,
                attempt=attempt,
                error=error,
                retry_in_s=None if last else delay,
            )
            await self.store.append(WEBHOOK_STREAM, [failed])
            if not last:
                await anyio.sleep(delay)
                delay *= 2
        log.warning("webhook for %s #%d: gave up after %d attempts", event.type, event.seq, attempt)
        gave_up = WebhookGaveUp(
            for_seq=event.seq, job_id=event.job_id, attempts=self.settings.attempts, error=error
        )
        await self.store.append(WEBHOOK_STREAM, [gave_up])
