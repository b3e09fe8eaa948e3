"""A real `dropkiln serve` (uvicorn) subprocess on a loopback port, for the tests that need
sockets: SSE, slow clients, many clients, the end-to-end run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from dropkiln.api.token import read_token


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        token = read_token(self.root / "state" / "api-token")
        assert token is not None
        return token

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.auth, **kwargs)  # type: ignore[arg-type]


@contextmanager
def serving(root: Path, env: dict[str, str] | None = None, *args: str) -> Iterator[Server]:
    """`dropkiln serve` on a free loopback port until the block ends (then SIGTERM)."""
    port = free_port()
    log = root / "serve.log"
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dropkiln",
                "serve",
                "--root",
                str(root),
                "--port",
                str(port),
                *args,
            ],
            env={**os.environ, **(env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    server = Server(root, port, proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dropkiln serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(log.read_text())
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
