"""The FastAPI application: one store, one event hub, the bearer token on every route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request

from dropkiln import __version__
from dropkiln.api import files, jobs, uploads
from dropkiln.api.auth import BearerAuth, FailureLimiter, TokenFile
from dropkiln.api.errors import install_handlers
from dropkiln.api.hub import EventHub
from dropkiln.api.state import ApiState
from dropkiln.config import Settings
from dropkiln.store import daemon_state
from dropkiln.store.backend import open_store

DESCRIPTION = """\
The HTTP face of a dropkiln daemon. It writes only what a drop or a CLI command writes
(files into the drop folder, command events) and reads the same event store.
Send `Authorization: Bearer TOKEN` (the token is in `ROOT/state/api-token`).
Errors are `{"error": {"code": …, "message": …}}`.
"""


def create_app(settings: Settings) -> FastAPI:
    """The API for the dropkiln home of ``settings``; the store opens with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        uploads.sweep_staging([settings.paths.datasets, settings.paths.prompts])
        async with await open_store(settings.paths.db, settings.store_url) as store:
            api = settings.api
            hub = EventHub(
                store,
                buffer=api.stream_buffer,
                max_subscribers=api.max_streams,
                poll_interval=settings.poll_interval,
            )
            app.state.api = ApiState(settings, store, hub)
            app.state.auth = BearerAuth(
                TokenFile(settings.paths.api_token),
                FailureLimiter(api.auth_failures, api.auth_window_s),
                store,
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(hub.run, name="event hub")
                yield
                tg.cancel_scope.cancel()

    async def authenticated(request: Request) -> None:
        await request.app.state.auth(request)

    app = FastAPI(
        title="dropkiln",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # The schema is served below, behind the token like every route but /healthz.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_handlers(app)
    guarded = [Depends(authenticated)]
    for router in (jobs.router, uploads.router, files.router):
        app.include_router(router, dependencies=guarded)

    @app.get("/v1/openapi.json", tags=["health"], dependencies=guarded, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/healthz", tags=["health"], summary="Liveness, no token needed")
    async def healthz() -> dict[str, Any]:
        state: ApiState = app.state.api
        daemon = await daemon_state(state.store)
        return {"ok": True, "version": __version__, "daemon_running": daemon.running()}

    return app
