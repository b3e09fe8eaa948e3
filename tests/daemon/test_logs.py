"""Log lines for journald (priority prefixes, no timestamps) and for people (timestamps)."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from dropkiln.daemon.logs import QUIET_LOGGERS, journal_priority, logs_to_journal, setup_logging

HUMAN_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) +(?P<name>[\w.]+): (?P<msg>.*)$"
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state; put it back for the next test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[TextIO]:
    """A stand-in for stderr with a real file descriptor, as journald's stream has."""
    with (tmp_path / "stderr").open("w+", encoding="utf-8") as stream:
        yield stream


def announce_journal(monkeypatch: pytest.MonkeyPatch, stream: TextIO) -> None:
    stat = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")


def written(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_under_journald_each_line_has_a_priority_prefix_and_no_timestamp(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO
) -> None:
    announce_journal(monkeypatch, stderr_file)
    setup_logging("debug", stream=stderr_file)
    log = logging.getLogger("dropkiln.daemon.watcher")

    log.critical("store is corrupt")
    log.error("drop %s rejected", "cats.zip")
    log.warning("low disk")
    log.info("taken drop cats")
    log.debug("settling")

    assert written(stderr_file) == [
        "<2>dropkiln.daemon.watcher: store is corrupt",
        "<3>dropkiln.daemon.watcher: drop cats.zip rejected",
        "<4>dropkiln.daemon.watcher: low disk",
        "<6>dropkiln.daemon.watcher: taken drop cats",
        "<7>dropkiln.daemon.watcher: settling",
    ]


def test_under_journald_every_line_of_a_traceback_keeps_the_priority(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO
) -> None:
    announce_journal(monkeypatch, stderr_file)
    setup_logging("INFO", stream=stderr_file)

    try:
        raise ValueError("bad caption\nsecond line")
    except ValueError:
        logging.getLogger("dropkiln.daemon.executor").exception("job 3 failed")

    lines = written(stderr_file)
    assert lines[0] == "<3>dropkiln.daemon.executor: job 3 failed"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-2:] == ["<3>ValueError: bad caption", "<3>second line"]
    assert all(line.startswith("<3>") for line in lines)


def test_outside_journald_lines_carry_a_timestamp_and_level_name(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("INFO", stream=stderr_file)
    log = logging.getLogger("dropkiln.daemon")

    log.warning("queue paused")
    log.info("ready")
    log.debug("not shown at INFO")

    lines = written(stderr_file)
    assert len(lines) == 2
    first, second = (HUMAN_LINE.match(line) for line in lines)
    assert first is not None and second is not None, lines
    assert (first["level"], first["name"], first["msg"]) == (
        "WARNING",
        "dropkiln.daemon",
        "queue paused",
    )
    assert (second["level"], second["msg"]) == ("INFO", "ready")
    assert not any(line.startswith("<") for line in lines)


def test_a_journal_stream_inherited_but_redirected_is_not_the_journal(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO, tmp_path: Path
) -> None:
    with (tmp_path / "journal").open("w") as journal:
        announce_journal(monkeypatch, journal)
    assert not logs_to_journal(stderr_file)

    setup_logging("INFO", stream=stderr_file)
    logging.getLogger("dropkiln").info("hello")

    [line] = written(stderr_file)
    assert HUMAN_LINE.match(line), line


@pytest.mark.parametrize("announced", ["", "garbage", "12:", ":34", "1:2:3"])
def test_a_malformed_journal_stream_is_not_the_journal(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO, announced: str
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", announced)

    assert not logs_to_journal(stderr_file)


def test_a_stream_without_a_descriptor_is_not_the_journal(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO
) -> None:
    announce_journal(monkeypatch, stderr_file)

    assert logs_to_journal(stderr_file)
    assert not logs_to_journal(io.StringIO())


def test_setting_up_twice_replaces_the_handler_instead_of_doubling_lines(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("INFO", stream=stderr_file)
    setup_logging("WARNING", stream=stderr_file)

    logging.getLogger("dropkiln").info("hidden at WARNING")
    logging.getLogger("dropkiln").warning("shown once")

    lines = written(stderr_file)
    assert len(lines) == 1
    assert lines[0].endswith("WARNING dropkiln: shown once")


def test_chatty_libraries_are_held_back_unless_they_have_something_to_say(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO
) -> None:
    announce_journal(monkeypatch, stderr_file)
    setup_logging("DEBUG", stream=stderr_file)

    logging.getLogger("watchfiles.main").info("1 change detected")
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR' 16 13")
    logging.getLogger("watchfiles.main").warning("watch lost")
    logging.getLogger("dropkiln.store").debug("appended 3 events")

    assert written(stderr_file) == [
        "<4>watchfiles.main: watch lost",
        "<7>dropkiln.store: appended 3 events",
    ]


def test_python_warnings_become_warning_records(
    monkeypatch: pytest.MonkeyPatch, stderr_file: TextIO
) -> None:
    announce_journal(monkeypatch, stderr_file)
    setup_logging("INFO", stream=stderr_file)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("attention slicing is slow", UserWarning, stacklevel=1)

    lines = written(stderr_file)
    assert lines[0].startswith("<4>py.warnings: ")
    assert "UserWarning: attention slicing is slow" in lines[0]
    assert all(line.startswith("<4>") for line in lines)


def test_an_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown log level 'loud'.*DEBUG"):
        setup_logging("loud", stream=io.StringIO())


@pytest.mark.parametrize(
    ("levelno", "priority"),
    [(logging.DEBUG, 7), (5, 7), (logging.INFO, 6), (25, 6), (logging.WARNING, 4), (45, 3)],
)
def test_custom_levels_map_to_the_priority_below_them(levelno: int, priority: int) -> None:
    assert journal_priority(levelno) == priority
