"""What every ``dropkiln`` command shares: its one-line error, ROOT's settings or layout,
and the root's store."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from dropkiln.paths import Paths, root_from

if TYPE_CHECKING:
    from dropkiln.config import Settings
    from dropkiln.store import EventStore


class CommandError(Exception):
    """A one-line reason; the command exits non-zero."""


def settings_of(args: argparse.Namespace) -> Settings:
    from dropkiln.config import Settings

    return Settings.load(root=args.root)


def paths_of(args: argparse.Namespace) -> Paths:
    """The layout under ROOT, without loading the settings (for the quick commands)."""
    return Paths(root_from(args.root).absolute())


def run_async(coro_fn: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    import anyio

    return anyio.run(coro_fn) or 0


def run_inline(coro_fn: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """Run a command whose store is inline (``open_root_store(..., inline=True)``): its
    coroutine never waits, so it finishes at its first step, with no event loop. Starting
    asyncio and anyio's backend was half of `status`'s 0.2 s on a 2-core box."""
    coro = coro_fn()
    try:
        coro.send(None)
    except StopIteration as done:
        return int(done.value or 0)
    coro.close()
    raise RuntimeError("a command on an inline store waited for something")


async def open_root_store(
    paths: Paths, store_url: str | None = None, *, inline: bool = False
) -> EventStore:
    """The root's store: its SQLite file, or the PostgreSQL database ``store_url`` names
    (by default as the settings say, read without loading them); ``inline`` for
    ``run_inline``."""
    from dropkiln.store.backend import open_store

    url = paths.store_url if store_url is None else store_url
    return await open_store(paths.db, url, inline=inline)
