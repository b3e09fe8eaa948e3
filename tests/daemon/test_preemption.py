"""Generation preempts training at a checkpoint; training resumes to the same LoRA."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dropkiln.config import Settings
from dropkiln.store import list_jobs
from tests.daemon.harness import ended, running_daemon, types_of, wait_job
from tests.daemon.test_ingest import SMALL, drop_dataset, wait_drops
from tests.daemon.test_prompt_drops import TINY, place

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    """A hash of the LoRA's tensors (the header's metadata holds dates and paths)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + tensors[key].tobytes())
    return digest.hexdigest()


async def train_once(settings: Settings, *, preempt: bool) -> tuple[str, list[str]]:
    settings.train.steps = 60
    settings.train.checkpoint_every = 25
    settings.train.rank = 2
    async with running_daemon(settings) as daemon:
        drop_dataset(settings, "pets", toml=SMALL, seed=5)
        await wait_drops(daemon.store, 1)
        train = next(j for j in await list_jobs(daemon.store) if j.stage == "train")
        if preempt:
            await wait_job(daemon.store, train.id, lambda j: j.state == "running" and j.done >= 2)
            place(settings, "now.toml", TINY + '[[image]]\nprompt = "now"\n')
            await wait_drops(daemon.store, 2)
            generate = next(j for j in await list_jobs(daemon.store) if j.stage == "generate")
            generate = await wait_job(daemon.store, generate.id, ended, timeout=120)
            assert generate.state == "succeeded", generate.error
        train = await wait_job(daemon.store, train.id, ended, timeout=180)
        assert train.state == "succeeded", train.error
        assert train.result is not None
        return digest(Path(train.result["lora"])), await types_of(daemon.store, train.id)


async def test_generation_preempts_training_and_the_lora_is_unchanged(
    tmp_path: Path,
) -> None:
    quiet = Settings.load(root=tmp_path / "a", settle_seconds=0.2, telemetry_every_s=0.5)
    # preempted as soon as the prompt file is taken (preempt_after_s has its own test)
    busy = Settings.load(
        root=tmp_path / "b", settle_seconds=0.2, telemetry_every_s=0.5, preempt_after_s=0
    )
    for s in (quiet, busy):
        s.paths.create()
    undisturbed, quiet_types = await train_once(quiet, preempt=False)
    preempted, busy_types = await train_once(busy, preempt=True)
    assert "JobPreempted" not in quiet_types
    assert "JobPreempted" in busy_types
    assert busy_types.count("JobStarted") == 2
    assert preempted == undisturbed
