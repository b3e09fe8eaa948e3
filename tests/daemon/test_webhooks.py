"""Webhooks: signed, retried with backoff, recorded, resumed after a restart, never in the way.

The receiver is a plain stdlib HTTP server on 127.0.0.1 that checks the signature the way a
user's receiver would: HMAC-SHA256 of the raw body with the shared secret (Python's hmac).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest

from dropkiln.config import Settings, WebhookSettings
from dropkiln.daemon.webhooks import WebhookSender
from dropkiln.store import EventStore
from dropkiln.store.events import JobFailed, JobStarted, JobSubmitted, JobSucceeded, job_stream
from tests.daemon.harness import ended, running_daemon, submit, use_step_stages, wait_job

SECRET = "s3cret-for-tests"


@dataclass
class Receiver:
    url: str
    statuses: list[int] = field(default_factory=list)
    """What to answer, in order; 200 once the list runs out."""
    hang_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            state.received.append(
                {
                    "body": json.loads(body),
                    "signed": hmac.compare_digest(expected, self.headers["X-Dropkiln-Signature"]),
                    "event": self.headers["X-Dropkiln-Event"],
                    "delivery": self.headers["X-Dropkiln-Delivery"],
                }
            )
            if state.hang_s:
                time.sleep(state.hang_s)
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def hooks(url: str, **overrides: Any) -> WebhookSettings:
    return WebhookSettings(
        **{"url": url, "secret": SECRET, "backoff_s": 0.01, "timeout_s": 2.0} | overrides
    )


async def finished_job(store: EventStore, job_id: str, ok: bool = True) -> int:
    submitted = JobSubmitted(
        job_id=job_id, stage="train", name="cats", lane="gpu", priority=1, spec={}
    )
    started = JobStarted(attempt=1, memory_rung=0)  # a legal life: `store check` follows
    end = JobSucceeded(result={"lora": "x"}) if ok else JobFailed(reason="boom")
    return (await store.append(job_stream(job_id), [submitted, started, end]))[-1].seq


async def records(store: EventStore, count: int) -> list[Any]:
    with anyio.fail_after(20):
        while len(found := await store.read(0, stream="webhooks")) < count:
            await anyio.sleep(0.02)
    return found


async def test_a_finished_job_is_posted_signed_after_retries(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    async with await EventStore.open(settings.paths.db, create=True) as store:
        sender = WebhookSender(hooks(receiver.url, attempts=3), store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.run, 0, 0.01)
            seq = await finished_job(store, "aaaa1111")
            found = await records(store, 3)
            tg.cancel_scope.cancel()
    assert [e.type for e in found] == ["WebhookAttemptFailed"] * 2 + ["WebhookDelivered"]
    assert [e.data["error"] for e in found[:2]] == ["HTTP 500", "HTTP 503"]
    assert [e.data["retry_in_s"] for e in found[:2]] == [0.01, 0.02]  # doubling backoff
    assert found[2].data == {"for_seq": seq, "job_id": "aaaa1111", "attempt": 3, "status": 200}
    assert len(receiver.received) == 3 and all(r["signed"] for r in receiver.received)
    body = receiver.received[-1]["body"]
    assert body["event"]["type"] == "JobSucceeded" and body["event"]["seq"] == seq
    assert body["job"]["id"] == "aaaa1111" and body["job"]["state"] == "succeeded"
    assert receiver.received[-1]["delivery"] == str(seq)


async def test_it_gives_up_after_the_last_attempt_and_goes_on(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.statuses = [500, 500]
    async with await EventStore.open(settings.paths.db, create=True) as store:
        sender = WebhookSender(hooks(receiver.url, attempts=2), store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.run, 0, 0.01)
            await finished_job(store, "aaaa1111")
            failed_seq = await finished_job(store, "bbbb2222", ok=False)
            found = await records(store, 4)
            tg.cancel_scope.cancel()
    assert [e.type for e in found] == [
        "WebhookAttemptFailed",
        "WebhookAttemptFailed",
        "WebhookGaveUp",
        "WebhookDelivered",
    ]
    assert found[1].data["retry_in_s"] is None
    assert found[3].data["for_seq"] == failed_seq
    assert receiver.received[-1]["event"] == "JobFailed"


async def test_a_restart_resumes_after_the_last_delivery_and_sends_nothing_twice(
    settings: Settings, receiver: Receiver
) -> None:
    async with await EventStore.open(settings.paths.db, create=True) as store:
        await finished_job(store, "old00000")  # before webhooks were set up: never sent
        sender = WebhookSender(hooks(receiver.url), store)
        assert await sender.resume_point() == await store.last_seq()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.run, None, 0.01)
            await anyio.sleep(0.1)
            await finished_job(store, "aaaa1111")
            await records(store, 1)
            tg.cancel_scope.cancel()
        await finished_job(store, "bbbb2222")  # while "stopped"
        async with anyio.create_task_group() as tg:
            tg.start_soon(WebhookSender(hooks(receiver.url), store).run, None, 0.01)
            await records(store, 2)
            tg.cancel_scope.cancel()
    assert [r["body"]["job"]["id"] for r in receiver.received] == ["aaaa1111", "bbbb2222"]


async def test_a_hanging_receiver_never_holds_up_the_daemon(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_step_stages(monkeypatch)
    receiver.hang_s = 5.0  # every attempt times out after 1 s: 2 s at least per job
    settings.webhooks = hooks(receiver.url, attempts=2, timeout_s=1.0)
    async with running_daemon(settings) as daemon:
        for job_id in ("j1", "j2", "j3"):
            await submit(daemon.store, job_id, steps=2)
        for job_id in ("j1", "j2", "j3"):
            assert (await wait_job(daemon.store, job_id, ended)).state == "succeeded"
        # all three jobs ran to the end while the first delivery was still being tried
        settled = await daemon.store.read(0, types=["WebhookDelivered", "WebhookGaveUp"])
        assert len(settled) < 3
        [first] = await records(daemon.store, 1)
    assert first.type == "WebhookAttemptFailed" and "Timeout" in first.data["error"]


def test_a_webhook_url_needs_a_secret_and_http() -> None:
    with pytest.raises(ValueError, match="needs a secret"):
        WebhookSettings(url="http://127.0.0.1:9/x")
    with pytest.raises(ValueError, match="not an http"):
        WebhookSettings(url="file:///etc/passwd", secret="s")
    assert WebhookSettings().url == ""
