"""Logging to stderr in the form its reader wants: journald under systemd, a person otherwise.

Under systemd, stderr is a stream into journald (``$JOURNAL_STREAM`` names it). journald stamps
every line itself and reads a ``<N>`` syslog-priority prefix (sd-daemon(3)), so each line gets
that prefix and no timestamp, and ``journalctl -p warning -u dropkiln`` works. Anywhere else a
line carries its own timestamp and level name.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["JournalFormatter", "journal_priority", "logs_to_journal", "setup_logging"]

HUMAN_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"
HUMAN_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_HANDLER_NAME = "dropkiln.stderr"

# Libraries that log per file change or per SQL statement: their chatter would bury ours.
QUIET_LOGGERS = {
    "watchfiles": logging.WARNING,
    "PIL": logging.INFO,
    "matplotlib": logging.WARNING,
}


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, with the prefix repeated on every line of a multi-line record."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        # A traceback's lines would otherwise land in the journal at the default priority.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def journal_priority(levelno: int) -> int:
    """The syslog priority for a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def logs_to_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journald stream systemd announced in $JOURNAL_STREAM."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        announced = (int(device), int(inode))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # Not announced, malformed, or a stream without a file descriptor (a test's capture).
        return False
    # Inherited from a parent under systemd but redirected since: not the journal.
    return announced == (stat.st_dev, stat.st_ino)


def setup_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Log at `level` ("INFO", "debug", ...) to stderr, replacing an earlier setup."""
    levelno = _parse_level(level)
    target = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(target)
    if logs_to_journal(target):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(HUMAN_FORMAT, HUMAN_DATE_FORMAT))
    handler.set_name(_HANDLER_NAME)

    root = logging.getLogger()
    for previous in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(previous)
        previous.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(levelno, quiet_level))
    # Library warnings (torch, diffusers) then reach the journal as warnings, one record each.
    logging.captureWarnings(True)
    return handler


def _parse_level(level: str) -> int:
    names = logging.getLevelNamesMapping()
    levelno = names.get(level.strip().upper())
    if levelno is None:
        choices = ", ".join(n for n in names if n not in ("NOTSET", "WARN", "FATAL"))
        raise ValueError(f"unknown log level {level!r}; use one of {choices}")
    return levelno
