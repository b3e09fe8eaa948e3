"""The PNG writer: a batch's files are written beside the next denoise, and a thread that
waits for them writes the ones the writer thread has not started yet."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dropkiln.stages.base import write_atomic
from dropkiln.stages.generation import png_writer
from dropkiln.stages.generation.png_writer import PngWriter


def test_settling_writes_the_images_the_writer_thread_has_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_may_finish = threading.Event()
    writers: dict[str, str] = {}

    def recording_write(target: Path, data: bytes) -> Path:
        writers[target.name] = threading.current_thread().name
        if target.name == "0.png":
            # the writer thread is busy with this one until another thread wrote the last
            first_may_finish.wait(timeout=5)
        if target.name == "2.png":
            first_may_finish.set()
        return write_atomic(target, data)

    monkeypatch.setattr(png_writer, "write_atomic", recording_write)
    writer = PngWriter()
    recorded: list[str] = []
    try:
        for number in range(3):
            image = Image.new("RGB", (8, 8), (number, 0, 0))
            writer.submit(image, tmp_path / f"{number}.png", PngInfo(),
                          lambda target, *_: recorded.append(target.name))  # fmt: skip
        writer.then(lambda: recorded.append("checkpoint"))
        writer.settle()
    finally:
        writer.close()
    assert writers["0.png"].startswith("dropkiln-png")
    # the settling (here: the main) thread wrote the last, while the writer was still busy
    assert writers["2.png"] == threading.current_thread().name
    # recorded in order, whichever thread wrote them, then the batch's checkpoint
    assert recorded == ["0.png", "1.png", "2.png", "checkpoint"]
    for number in range(3):
        with Image.open(tmp_path / f"{number}.png") as written:
            assert written.getpixel((0, 0)) == (number, 0, 0)


def test_a_failed_write_on_the_settling_thread_raises_after_the_ones_before_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def failing_write(target: Path, data: bytes) -> Path:
        if target.name == "0.png":
            release.wait(timeout=5)
        if target.name == "1.png":
            release.set()
            raise OSError(28, "No space left on device")
        return write_atomic(target, data)

    monkeypatch.setattr(png_writer, "write_atomic", failing_write)
    writer = PngWriter()
    recorded: list[str] = []
    try:
        for number in range(3):
            writer.submit(Image.new("RGB", (8, 8)), tmp_path / f"{number}.png", PngInfo(),
                          lambda target, *_: recorded.append(target.name))  # fmt: skip
        with pytest.raises(OSError, match="No space"):
            writer.settle()
    finally:
        writer.close()
    assert recorded == ["0.png"]
