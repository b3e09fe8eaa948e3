"""An API app over a fresh dropkiln home, driven in-process with httpx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from dropkiln.api.app import create_app
from dropkiln.api.token import read_token, write_token
from dropkiln.config import Settings
from dropkiln.store import EventStore


@dataclass
class Api:
    settings: Settings
    client: httpx.AsyncClient
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def store(self) -> EventStore:
        return self.client._transport.app.state.api.store  # type: ignore[attr-defined]


async def make_home(settings: Settings) -> str:
    settings.paths.create()
    async with await EventStore.open(settings.paths.db, create=True):
        pass
    write_token(settings.paths.api_token)
    token = read_token(settings.paths.api_token)
    assert token is not None
    return token


def client_for(app: object, client: tuple[str, int] = ("192.0.2.10", 50000)) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=client)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://dropkiln.test")


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    """The app's lifespan, held by one task (its task group must exit where it entered)."""
    started, stop = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with app.router.lifespan_context(app):
            started.set()
            await stop.wait()

    task = asyncio.create_task(hold())
    await asyncio.wait([task, asyncio.create_task(started.wait())], return_when="FIRST_COMPLETED")
    if task.done():
        task.result()
    try:
        yield
    finally:
        stop.set()
        await task


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    token = await make_home(settings)
    app = create_app(settings)
    async with running(app), client_for(app) as client:
        yield Api(settings, client, token)


def home_of(settings: Settings) -> Path:
    return settings.root
