"""The API's bearer token file (``state/api-token``, mode 0600): plain files, no web stack,
so `dropkiln init` and `dropkiln api-token` start quickly."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_BYTES = 32


def write_token(path: Path) -> str:
    """A new random token in ``path`` (mode 0600, replacing any old one in one rename)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(hidden, path)
    return token


def ensure_token(path: Path) -> bool:
    """Make a token unless one exists; True if one was made."""
    if path.exists():
        return False
    write_token(path)
    return True


def read_token(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    return token or None
