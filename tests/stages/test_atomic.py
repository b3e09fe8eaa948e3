"""Atomic writes: whole or absent, and readable as the umask says (not mkstemp's 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dropkiln.stages.base import atomic_path, write_atomic


def test_atomic_write_honours_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        target = write_atomic(tmp_path / "out.png", b"data")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"data"
    assert target.stat().st_mode & 0o777 == 0o640


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
