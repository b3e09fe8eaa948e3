"""The Textual dashboard: ``dropkiln tui``. Reads the store; writes only command events.

Textual is imported on first use, so the CLI can share ``dropkiln.tui.format`` cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dropkiln.tui.app import DropkilnApp

__all__ = ["DropkilnApp", "run"]


def run(root: Path, poll_interval: float = 0.1) -> None:
    """Run the dashboard on the dropkiln home at ``root`` until the user quits."""
    from dropkiln.tui.app import run as run_app

    run_app(root, poll_interval=poll_interval)


def __getattr__(name: str) -> Any:
    if name == "DropkilnApp":
        from dropkiln.tui.app import DropkilnApp

        return DropkilnApp
    raise AttributeError(name)
