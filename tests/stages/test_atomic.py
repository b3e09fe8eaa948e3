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


# Torn writes: an injected full or failing disk fails the write call itself, part-way ------


@pytest.mark.parametrize(
    ("kind", "code", "text"),
    [("enospc", 28, "No space left on device"), ("eio", 5, "Input/output error")],
)
def test_an_injected_disk_fault_tears_the_write_itself(
    tmp_path: Path, kind: str, code: int, text: str
) -> None:
    from dropkiln.stages.base import write_file
    from dropkiln.stages.faults import FaultInjector

    faults = FaultInjector(f"{kind}@stage.write:1")
    faults.hit("stage.write")  # arms the next write of this thread
    path = tmp_path / "shard.bin"
    with pytest.raises(OSError, match=text) as raised:
        write_file(path, bytes(range(256)) * 40)
    assert raised.value.errno == code
    assert path.read_bytes() == (bytes(range(256)) * 40)[:5120]  # half landed, as on a disk
    write_file(path, b"whole")  # one write only: the next one is whole
    assert path.read_bytes() == b"whole"


def test_a_torn_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    from dropkiln.stages.faults import FaultInjector

    target = write_atomic(tmp_path / "image.png", b"the good old one")
    faults = FaultInjector("enospc@generate.image")
    faults.hit("generate.image")
    with pytest.raises(OSError, match=r"No space left on device: injected at generate\.image"):
        write_atomic(target, b"x" * 100_000)
    assert target.read_bytes() == b"the good old one"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_a_torn_write_is_armed_for_the_thread_that_hit_the_point(tmp_path: Path) -> None:
    import threading

    from dropkiln.stages.base import write_file
    from dropkiln.stages.faults import FaultInjector, take_torn_write

    faults = FaultInjector("eio@cache.batch")
    worker = threading.Thread(target=faults.hit, args=("cache.batch",))
    worker.start()
    worker.join()
    write_file(tmp_path / "other-thread.bin", b"untouched")  # this thread was not armed
    assert (tmp_path / "other-thread.bin").read_bytes() == b"untouched"
    assert take_torn_write() is None
