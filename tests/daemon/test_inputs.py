"""A job reads the files its dependencies recorded; on a shared filesystem (another box wrote
them) they can show up late. The job waits for them, then fails naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from dropkiln.config import Settings
from dropkiln.daemon.inputs import Input
from dropkiln.store import find_job, job_artifacts
from tests.daemon.harness import ended, running_daemon, submit, types_of, use_step_stages, wait_job


@pytest.fixture(autouse=True)
def _stages(monkeypatch: pytest.MonkeyPatch) -> None:
    use_step_stages(monkeypatch)


async def _finished_upstream(settings: Settings, daemon_store: object) -> Path:
    await submit(daemon_store, "up", steps=1)  # type: ignore[arg-type]
    assert (await wait_job(daemon_store, "up", ended)).state == "succeeded"  # type: ignore[arg-type]
    (recorded,) = await job_artifacts(daemon_store, "up")  # type: ignore[arg-type]
    return Path(recorded["path"])


async def test_a_recorded_input_this_box_cannot_see_fails_the_job_naming_it(
    settings: Settings,
) -> None:
    settings.executor.input_wait_seconds = 0.6
    async with running_daemon(settings) as daemon:
        store = daemon.store
        out = await _finished_upstream(settings, store)
        kept = out.read_bytes()
        out.unlink()  # the box that runs "down" does not see the file "up" wrote
        await submit(store, "down", depends_on=["up"], steps=2, needs="steps")
        down = await wait_job(store, "down", ended)
        assert down.state == "failed"
        assert down.error is not None
        assert str(out) in down.error and "job up" in down.error
        assert "not visible on this box after waiting 0.6 s" in down.error
        # The stage never ran: nothing was checkpointed, and the file was not made up.
        assert "CheckpointSaved" not in await types_of(store, "down")
        assert not out.exists()
        out.write_bytes(kept)


async def test_an_input_that_shows_up_late_is_waited_for(settings: Settings) -> None:
    settings.executor.input_wait_seconds = 30
    async with running_daemon(settings) as daemon:
        store = daemon.store
        out = await _finished_upstream(settings, store)
        kept = out.read_bytes()
        out.unlink()
        await submit(store, "down", depends_on=["up"], steps=1, needs="steps")
        await anyio.sleep(0.8)
        assert not (await find_job(store, "down")).terminal
        out.write_bytes(kept)  # the shared filesystem shows it now
        down = await wait_job(store, "down", ended)
        assert down.state == "succeeded"
        assert down.result is not None and down.result["upstream"]["ran"] == [1]


async def test_a_cancel_ends_the_wait(settings: Settings) -> None:
    settings.executor.input_wait_seconds = 60
    async with running_daemon(settings) as daemon:
        store = daemon.store
        out = await _finished_upstream(settings, store)
        out.unlink()
        await submit(store, "down", depends_on=["up"], steps=1, needs="steps")
        await wait_job(store, "down", lambda job: job.state == "running")
        await daemon.scheduler.cancel("down")
        assert (await wait_job(store, "down", ended, timeout=10)).state == "cancelled"
        out.write_text(json.dumps({"ran": [1]}))


def test_a_file_shorter_than_recorded_is_not_yet_visible(tmp_path: Path) -> None:
    """NFS may show the name before the contents: the recorded size must match."""
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"12345")
    assert Input("j", str(path), "lora", 5).visible()
    assert not Input("j", str(path), "lora", 9).visible()
    assert not Input("j", str(tmp_path / "gone"), "lora", 5).visible()
