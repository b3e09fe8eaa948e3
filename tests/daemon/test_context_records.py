"""The daemon's context records a checkpoint and the files it covers in one append (one
commit the stage's thread waits for, not one per file), with the hash the stage made of
the bytes it wrote instead of reading each file back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from dropkiln.daemon import context as context_module
from dropkiln.daemon.context import DaemonContext
from dropkiln.stages.base import Artifact
from dropkiln.stages.faults import FaultInjector
from dropkiln.store.events import ArtifactWritten, CheckpointSaved, Event


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_checkpoint_and_its_files_are_one_append_without_reading_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = []
    for number in range(3):
        files.append(tmp_path / f"{number}.png")
        files[-1].write_bytes(bytes([number]) * (100 + number))
    read_back: list[Path] = []
    real_hash = context_module.file_sha256
    monkeypatch.setattr(
        context_module, "file_sha256", lambda path: read_back.append(path) or real_hash(path)
    )
    appends: list[list[Event]] = []

    async def append(events: list[Event]) -> None:
        appends.append(events)

    ctx = DaemonContext(
        job_id="job", attempt=1, memory_rung=0, device="cpu", root=tmp_path,
        work_dir=tmp_path, resume=None, upstream={}, faults=FaultInjector(),
        recorded={str(files[0]): sha256(files[0])},  # by an earlier attempt
        append=append, token=anyio.lowlevel.current_token(),
    )  # fmt: skip
    batch = [Artifact(path, "image", sha256(path)) for path in files]
    state: dict[str, Any] = {"phase": "images", "done": 3}
    await anyio.to_thread.run_sync(ctx.checkpoint, state, batch)

    assert len(appends) == 1
    (events,) = appends
    assert [type(event) for event in events] == [ArtifactWritten, ArtifactWritten, CheckpointSaved]
    recorded = [event for event in events if isinstance(event, ArtifactWritten)]
    assert [(r.path, r.sha256, r.bytes) for r in recorded] == [
        (str(path), sha256(path), path.stat().st_size) for path in files[1:]
    ]
    assert read_back == []
    assert ctx.resume_state() == state

    # reported again (a resumed stage re-reports what it finds): nothing recorded twice
    await anyio.to_thread.run_sync(ctx.checkpoint, state, batch)
    assert [type(event) for event in appends[1]] == [CheckpointSaved]
    # a record without the stage's hash is hashed from the file, as before
    await anyio.to_thread.run_sync(ctx.artifact, files[2], "image")
    assert read_back == [files[2]] and len(appends) == 2
