"""`dropkiln serve` as users run it: a real uvicorn on loopback, real sockets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import psutil
import pytest

from dropkiln.api.serve import ServeOptions, ServeRefused, is_loopback, prepare
from dropkiln.cli import main
from dropkiln.config import Settings
from dropkiln.store import EventStore
from dropkiln.store.events import JobQueued, JobSubmitted, job_stream
from tests.api.server import Server, serving

READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("served") / "home"
    assert main(["init", str(root)]) == 0
    env = {"DROPKILN_API__READ_TIMEOUT_S": str(READ_TIMEOUT_S)}
    with serving(root, env) as running:
        yield running


async def append_jobs(root: Path, *job_ids: str) -> list[int]:
    seqs = []
    async with await EventStore.open(root / "state" / "dropkiln.db") as store:
        for job_id in job_ids:
            submitted = JobSubmitted(
                job_id=job_id, stage="bucket", name="n", lane="cpu", priority=1, spec={}
            )
            stored = await store.append(job_stream(job_id), [submitted, JobQueued()])
            seqs += [e.seq for e in stored]
    return seqs


async def make_database(settings: Settings) -> None:
    async with await EventStore.open(settings.paths.db, create=True):
        pass


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value


async def take(server: Server, count: int, **params: str | dict[str, str]) -> list[dict[str, str]]:
    headers = params.pop("headers", {})
    assert isinstance(headers, dict)
    got: list[dict[str, str]] = []
    async with (
        server.client(timeout=10) as client,
        client.stream("GET", "/v1/events", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        with anyio.fail_after(10):
            async for event in sse_events(response):
                got.append(event)
                if len(got) == count:
                    break
    return got


async def test_sse_resumes_after_last_event_id_and_filters_by_job(server: Server) -> None:
    seqs = await append_jobs(server.root, "e1e1e1e1", "e2e2e2e2")
    everything = await take(server, 4, since="0")
    assert [int(e["id"]) for e in everything][-4:] == seqs
    assert [e["event"] for e in everything][-4:] == ["JobSubmitted", "JobQueued"] * 2
    assert json.loads(everything[-1]["data"])["stream"] == "job:e2e2e2e2"
    # a reconnecting client says the last seq it saw and gets exactly what follows
    resumed = await take(server, 2, headers={"Last-Event-ID": str(seqs[1])})
    assert [int(e["id"]) for e in resumed] == seqs[2:]
    one_job = await take(server, 2, job="e1e1", since="0")
    assert [json.loads(e["data"])["stream"] for e in one_job] == ["job:e1e1e1e1"] * 2
    # live: a stream opened now sees the next event as it is appended
    async with anyio.create_task_group() as tg:
        live: list[dict[str, str]] = []

        async def listen() -> None:
            live.extend(await take(server, 1))

        tg.start_soon(listen)
        await anyio.sleep(0.5)
        later = await append_jobs(server.root, "e3e3e3e3")
    assert int(live[0]["id"]) == later[0]


async def test_a_stalled_upload_is_cut_off_and_leaves_nothing(server: Server) -> None:
    """Slow loris: headers promise a big body, a few bytes come, then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        (
            "POST /v1/datasets?name=slow HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server.token}\r\nContent-Type: application/zip\r\n"
            "Content-Length: 1000000\r\n\r\n"
        ).encode()
        + b"PK\x03\x04"
    )
    await writer.drain()
    with anyio.fail_after(READ_TIMEOUT_S + 10):
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        rest = await reader.read(4096)
    writer.close()
    assert status == b"408"
    assert b'"upload_timeout"' in rest
    drops = server.root / "drop" / "datasets"
    assert list(drops.iterdir()) == []


async def test_many_sse_clients_share_one_tail_with_bounded_memory(
    server: Server, request: pytest.FixtureRequest
) -> None:
    """1,000 clients with --full; 200 in the default run (the same code paths, 1.5 s)."""
    clients = 1000 if request.config.getoption("--full") else 200
    process = psutil.Process(server.proc.pid)
    before = process.memory_info().rss
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    request = (
        f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n\r\n"
    ).encode()
    try:
        for _ in range(clients):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            connections.append((reader, writer))
        with anyio.fail_after(60):
            for reader, _ in connections:
                head = await reader.readuntil(b"retry: 2000\n\n")
                assert b" 200 " in head.split(b"\r\n", 1)[0]
        connected = process.memory_info().rss
        # The database sees one tail, not one per client: the server's open handles on it
        # do not grow with the number of streams.
        db_handles = [f for f in process.open_files() if "dropkiln.db" in f.path]
        assert len(db_handles) <= 12, db_handles
        [seq, _] = await append_jobs(server.root, "f0f0f0f0")
        with anyio.fail_after(60):
            for reader, _ in connections:
                chunk = await reader.readuntil(b"\n\n")
                while b"id: " not in chunk:
                    chunk = await reader.readuntil(b"\n\n")
                assert f"id: {seq}\n".encode() in chunk
        grown = (connected - before) / 2**20
        assert grown < 200, f"{clients} SSE clients took {grown:.0f} MiB"
    finally:
        for _, writer in connections:
            writer.close()
    # and the server still answers at once
    async with server.client(timeout=10) as client:
        assert (await client.get("/v1/jobs")).status_code == 200


def test_serve_refuses_a_public_address_without_the_flag_and_a_token(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(settings.root)
    assert main(["serve", "--root", root]) == 1
    assert "dropkiln init" in capsys.readouterr().err  # no database yet: nothing to serve
    anyio.run(make_database, settings)
    assert main(["serve", "--root", root, "--host", "0.0.0.0"]) == 1
    assert "--public" in capsys.readouterr().err
    assert not settings.paths.api_token.exists()
    assert main(["serve", "--root", root, "--host", "0.0.0.0", "--public"]) == 1
    assert "api-token rotate" in capsys.readouterr().err
    with pytest.raises(ServeRefused):
        prepare(settings, ServeOptions("192.0.2.1", 1, public=False))
    # loopback: a token is made when missing, and --public is not needed
    assert prepare(settings, ServeOptions("127.0.0.1", 1)) == [
        f"made an API token in {settings.paths.api_token}"
    ]
    assert prepare(settings, ServeOptions("0.0.0.0", 1, public=True)) == []
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_the_api_never_imports_torch(tmp_path: Path) -> None:
    probe = f"""
import sys, anyio, httpx
from dropkiln.cli import main
from dropkiln.config import Settings
from dropkiln.api.app import create_app
from dropkiln.api.token import read_token
root = {str(tmp_path / "h")!r}
assert main(["init", root]) == 0
settings = Settings.load(root=root)
token = read_token(settings.paths.api_token)
async def run():
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            h = {{"Authorization": "Bearer " + token}}
            body = b'[defaults]\\nwidth=64\\nheight=64\\n[[image]]\\nprompt="x"\\n'
            body += b'[video]\\nfps=2\\n'
            r = await c.post("/v1/prompts?name=p", content=body,
                             headers=h | {{"Content-Type": "application/toml"}})
            assert r.status_code == 202, r.text
            for url in ("/v1/jobs", "/v1/loras", "/v1/openapi.json", "/healthz"):
                assert (await c.get(url, headers=h)).status_code == 200, url
anyio.run(run)
heavy = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_serve_rotate_token_replaces_it_before_serving(settings: Settings) -> None:
    from dropkiln.api.token import read_token, write_token

    anyio.run(make_database, settings)
    old = write_token(settings.paths.api_token)
    notes = prepare(settings, ServeOptions("127.0.0.1", 1, rotate_token=True))
    assert notes == [f"new API token in {settings.paths.api_token} (the old one no longer works)"]
    assert read_token(settings.paths.api_token) not in (None, old)
    with pytest.raises(ServeRefused, match="both"):
        prepare(settings, ServeOptions("127.0.0.1", 1, ssl_certfile="cert.pem"))
