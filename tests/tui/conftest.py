"""Fixtures for the dashboard: a realistic store, a frozen clock, a fixed time zone."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widget import Widget

from dropkiln.tui import DropkilnApp

from .history import NOW, write_history


@pytest.fixture(autouse=True)
def utc_display() -> Iterator[None]:
    """Clock times on screen are local; pin the zone so snapshots match everywhere."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture(scope="session")
def history_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("history") / "dropkiln.db"
    asyncio.run(write_history(path))
    return path


@pytest.fixture
def history_db(history_template: Path, tmp_path: Path) -> Path:
    """A private copy of the history store (tests may append commands to it)."""
    path = tmp_path / "state" / "dropkiln.db"
    path.parent.mkdir()
    shutil.copy(history_template, path)
    return path


@pytest.fixture
def make_app(history_db: Path) -> Callable[..., DropkilnApp]:
    def make(db_path: Path | None = None, now: float = NOW, **kwargs: object) -> DropkilnApp:
        return DropkilnApp(db_path or history_db, clock=lambda: now, **kwargs)  # type: ignore[arg-type]

    return make


async def wait_for(
    pilot: Pilot[None], condition: Callable[[], object], timeout: float = 30.0
) -> None:
    """Let the app run until ``condition()`` is true; fail after ``timeout`` seconds.

    Generous: it returns as soon as the condition holds, and on a machine with every core
    busy the first reads took over 5 s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await pilot.pause(0.02)


async def loaded(pilot: Pilot[None]) -> None:
    """Wait for the first full read and for the event log to show its window."""
    app = pilot.app
    assert isinstance(app, DropkilnApp)
    await wait_for(pilot, lambda: app.loaded)
    await wait_for(pilot, lambda: app.screen.query("#log") and app.screen.query_one("#log").lines)
    # On a loaded machine the first reads land over several frames: wait until what is on
    # screen stops changing, so snapshots never catch a half-drawn dashboard.
    previous, stable = None, 0
    deadline = time.monotonic() + 5.0
    while stable < 3 and time.monotonic() < deadline:
        await pilot.pause(0.1)
        frame = app.export_screenshot()
        stable = stable + 1 if frame == previous else 0
        previous = frame


def screen_lines(app: DropkilnApp) -> list[str]:
    """The text of each terminal row as composited: only what a person would see (a widget
    with ``display: none`` or scrolled out of view contributes nothing)."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def text_of(widget: Widget) -> str:
    """The plain text a widget renders (a Static's content, or what ``render`` draws)."""
    return str(widget.render())


def log_lines(log: object) -> list[str]:
    """The plain text of each line a RichLog holds."""
    return [strip.text.rstrip() for strip in getattr(log, "lines", [])]


def record_notifications(app: DropkilnApp) -> list[str]:
    """Collect the messages of ``app.notify`` (toasts vanish; tests read them here)."""
    messages: list[str] = []
    notify = app.notify

    def recording(message: str, **kwargs: Any) -> None:
        messages.append(message)
        notify(message, **kwargs)

    app.notify = recording  # type: ignore[method-assign]
    return messages
