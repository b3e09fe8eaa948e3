"""A drop is handed over only once it has settled; partial copies are never read."""

from __future__ import annotations

from pathlib import Path

from dropkiln.daemon.watcher import DropWatcher


def test_file_is_handed_over_once_after_it_settles(tmp_path: Path) -> None:
    watcher = DropWatcher([tmp_path], settle_seconds=2.0)
    (tmp_path / "p.toml").write_text("x")
    assert watcher.scan(now=0.0) == []
    assert watcher.scan(now=1.0) == []
    assert watcher.scan(now=2.5) == [tmp_path / "p.toml"]
    assert watcher.scan(now=10.0) == []


def test_a_growing_file_restarts_the_settle_clock(tmp_path: Path) -> None:
    watcher = DropWatcher([tmp_path], settle_seconds=2.0)
    target = tmp_path / "big.zip"
    target.write_bytes(b"a" * 10)
    watcher.scan(now=0.0)
    with target.open("ab") as handle:
        handle.write(b"b" * 10)
    assert watcher.scan(now=1.9) == []
    assert watcher.scan(now=3.0) == []  # only 1.1 s since the last change
    assert watcher.scan(now=4.0) == [target]


def test_a_folder_still_filling_or_holding_a_partial_file_waits(tmp_path: Path) -> None:
    watcher = DropWatcher([tmp_path], settle_seconds=1.0)
    folder = tmp_path / "cats"
    folder.mkdir()
    (folder / "1.png").write_bytes(b"x")
    (folder / "2.png.part").write_bytes(b"half")
    watcher.scan(now=0.0)
    assert watcher.scan(now=5.0) == []  # a .part file means a copy is still running
    (folder / "2.png.part").rename(folder / "2.png")
    assert watcher.scan(now=6.0) == []
    (folder / "3.png").write_bytes(b"y")
    assert watcher.scan(now=6.5) == []
    assert watcher.scan(now=7.6) == [folder]


def test_hidden_entries_are_ignored_and_a_reused_name_is_seen_again(tmp_path: Path) -> None:
    watcher = DropWatcher([tmp_path], settle_seconds=0.0)
    (tmp_path / ".cats.part").mkdir()
    (tmp_path / "a.txt").write_text("1")
    watcher.scan(now=0.0)
    assert watcher.scan(now=0.1) == [tmp_path / "a.txt"]
    (tmp_path / "a.txt").unlink()  # the ingestor moved it away
    assert watcher.scan(now=0.2) == []
    (tmp_path / "a.txt").write_text("2")
    watcher.scan(now=0.3)
    assert watcher.scan(now=0.4) == [tmp_path / "a.txt"]
