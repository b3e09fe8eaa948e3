"""Operator caps a drop cannot raise, and ids that never collide in practice."""

from __future__ import annotations

import itertools
import re

import anyio
import pytest

from dropkiln.cli import main
from dropkiln.config import Settings
from dropkiln.daemon import planner
from dropkiln.daemon.drops import DATASET, PROMPTS, DropRejection, parse_drop
from dropkiln.store import EventStore, list_jobs
from dropkiln.store.events import JobSubmitted, QueuePaused, job_stream
from tests.daemon.harness import running_daemon
from tests.daemon.test_ingest import SMALL, drop_dataset, wait_drops
from tests.samples import write_dataset


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("steps = 10000000", "steps = 10000000 is over the operator's cap limits.max_steps = "),
        ("batch_size = 4096", "batch_size = 4096 is over the operator's cap limits.max_batch_size"),
        ("gradient_accumulation = 100000", "limits.max_gradient_accumulation = 64"),
        ("checkpoint_every = 1", "checkpoint_every = 1 is below the operator's cap limits.min"),
        ("rank = 1024", "rank = 1024 is over the operator's cap limits.max_rank = 256"),
    ],
)
def test_defect15_a_dataset_toml_cannot_raise_the_operators_caps(
    settings: Settings, line: str, named: str
) -> None:
    dataset = write_dataset(settings.paths.datasets / "greedy", toml=SMALL + line + "\n")
    with pytest.raises(DropRejection, match=re.escape(named)):
        parse_drop(settings, dataset, DATASET, "d1")


def test_defect15_caps_are_the_operators_to_set(settings: Settings) -> None:
    settings.limits.max_steps = 20_000_000
    dataset = write_dataset(settings.paths.datasets / "big", toml=SMALL + "steps = 10000000\n")
    assert parse_drop(settings, dataset, DATASET, "d1").options.train.steps == 10_000_000
    # The operator's own defaults pass even past a cap: only a drop's own values are capped.
    settings.limits.max_steps = 100
    settings.train.steps = 500
    plain = write_dataset(settings.paths.datasets / "plain", toml=SMALL)
    assert parse_drop(settings, plain, DATASET, "d2").options.train.steps == 500


def test_defect15_a_prompt_file_cannot_raise_the_caps(settings: Settings) -> None:
    many = settings.paths.prompts / "many.toml"
    many.write_text('[[image]]\nprompt = "x"\ncount = 900\n[[image]]\nprompt = "y"\ncount = 200\n')
    with pytest.raises(DropRejection, match=r"images \(count, in all\) = 1100 .*max_images = 1000"):
        parse_drop(settings, many, PROMPTS, "d1")
    slow = settings.paths.prompts / "slow.toml"
    slow.write_text('[[image]]\nprompt = "x"\nsteps = 999\n')
    with pytest.raises(DropRejection, match=r"image\[0\]\.steps = 999 .*max_generate_steps"):
        parse_drop(settings, slow, PROMPTS, "d2")


def test_defect15_ids_are_128_bit() -> None:
    ids = {planner.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)


async def test_defect15_an_id_collision_is_a_rejection_not_a_crash(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force what 32-bit ids made likely: the second dataset's jobs get ids already taken.
    repeating = itertools.cycle(["jobaaaa1", "jobaaaa2", "jobaaaa3"])
    monkeypatch.setattr(planner, "new_id", lambda: next(repeating))
    async with running_daemon(settings) as daemon:
        await daemon.store.append("daemon", [QueuePaused(by="test")])
        drop_dataset(settings, "first", seed=1)
        await wait_drops(daemon.store, 1)
        drop_dataset(settings, "second", seed=2)
        drops = {d["name"]: d for d in await wait_drops(daemon.store, 2)}
        assert drops["first"]["state"] == "ingested"
        assert drops["second"]["state"] == "failed"
        assert "internal error while recording the drop" in str(drops["second"]["reason"])
        assert (settings.paths.failed / "second").is_dir()
        assert len(await list_jobs(daemon.store)) == 3


def test_defect15_status_shows_the_shortest_unambiguous_prefix(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ["abcdefgh1" + "0" * 23, "abcdefgh2" + "0" * 23, "f" * 32]

    async def write() -> None:
        async with await EventStore.open(settings.paths.db, create=True) as store:
            for job_id in ids:
                submitted = JobSubmitted(
                    job_id=job_id, stage="bucket", name="n", lane="cpu", priority=0, spec={}
                )
                await store.append(job_stream(job_id), [submitted])

    anyio.run(write)
    assert main(["status", "--root", str(settings.root)]) == 0
    shown = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert sorted(shown) == ["abcdefgh1", "abcdefgh2", "ffffffff"]
    # A prefix as shown is enough to name the job.
    assert main(["cancel", "abcdefgh2", "--root", str(settings.root)]) == 0
