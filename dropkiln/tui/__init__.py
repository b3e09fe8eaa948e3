"""The Textual dashboard: ``dropkiln tui``. Reads the store; writes only command events."""

from dropkiln.tui.app import DropkilnApp, run

__all__ = ["DropkilnApp", "run"]
