"""Moving drops out of the drop folder: failures are recorded and retried, never fatal;
a finished move is final; rejected zips leave nothing behind in state/."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from dropkiln.config import Settings
from dropkiln.store import EventStore, list_drops, list_jobs
from dropkiln.store.events import CancelRequested, QueuePaused, job_stream
from tests.daemon.harness import ended, running_daemon, submit, use_step_stages, wait_job
from tests.daemon.test_ingest import SMALL, drop_dataset, wait_drops
from tests.samples import write_dataset


@contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """The kernel refuses to rename anything out of ``folder`` (EPERM), even for root:
    what a drop folder the daemon may not write looks like, without dropping privileges."""
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


async def events_of_type(store: EventStore, type_name: str) -> list[dict[str, object]]:
    return [e.data for e in await store.read(0, limit=None, types=(type_name,))]


async def wait_for(store: EventStore, type_name: str, count: int, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while len(await events_of_type(store, type_name)) < count:
            await anyio.sleep(0.05)


async def test_defect01_unmovable_drop_is_retried_and_daemon_lives(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_step_stages(monkeypatch)
    drop_dataset(settings, "cats")
    drop_dataset(settings, "broken", toml=SMALL + "learning_rat = 0.1\n")
    datasets = settings.paths.datasets
    with immutable(datasets):
        async with running_daemon(settings) as daemon:
            store = daemon.store
            await wait_for(store, "DropMoveFailed", 2)
            failures = await events_of_type(store, "DropMoveFailed")
            assert all("Operation not permitted" in str(f["reason"]) for f in failures)
            assert (datasets / "cats").is_dir() and (datasets / "broken").is_dir()
            # The daemon still serves: other work runs meanwhile …
            await submit(store, "other", steps=2)
            assert (await wait_job(store, "other", ended)).state == "succeeded"
            # … but the stuck drop's jobs wait for their folder instead of failing.
            bucket = next(j for j in await list_jobs(store) if j.stage == "bucket")
            assert bucket.state == "queued"
            # Only the bucket job is of interest below; the model-loading ones are dropped.
            for job in await list_jobs(store):
                if job.stage in ("cache", "train"):
                    await store.append(job_stream(job.id), [CancelRequested(by="test")])
        # A restart while the folder is still unwritable starts, and takes nothing twice.
        async with running_daemon(settings) as daemon:
            await wait_for(daemon.store, "DropMoveFailed", 4)
            assert len(await list_drops(daemon.store)) == 2
    async with running_daemon(settings) as daemon:
        store = daemon.store
        await wait_for(store, "DropMoved", 2)
        assert not any(datasets.iterdir())
        assert (settings.paths.failed / "broken.error.txt").is_file()
        drops = {d["name"]: d for d in await list_drops(store)}
        assert Path(str(drops["cats"]["stored"])).is_dir()
        bucket = next(j for j in await list_jobs(store) if j.stage == "bucket")
        assert (await wait_job(store, bucket.id, ended)).state == "succeeded"


async def test_defect01_move_failure_while_running_is_retried_with_backoff(
    settings: Settings,
) -> None:
    async with running_daemon(settings) as daemon:
        store = daemon.store
        # failed/ refuses new entries: neither NAME.error.txt nor the drop can go there.
        with immutable(settings.paths.failed):
            (settings.paths.prompts / "nonsense.png").write_bytes(b"not a prompt file")
            await wait_for(store, "DropMoveFailed", 2, timeout=10)
            tries = await events_of_type(store, "DropMoveFailed")
            assert [t["attempt"] for t in tries[:2]] == [1, 2]
            assert [t["retry_in_s"] for t in tries[:2]] == [1.0, 2.0]
            assert "Operation not permitted" in str(tries[0]["reason"])
            assert (settings.paths.prompts / "nonsense.png").is_file()
        await wait_for(store, "DropMoved", 1, timeout=10)
        assert (settings.paths.failed / "nonsense.png").is_file()
        assert "not a prompt file" in (settings.paths.failed / "nonsense.png.error.txt").read_text()


async def drop_folder_empty(settings: Settings, timeout: float = 20) -> None:
    """Until every drop in drop/datasets has been moved away."""
    with anyio.fail_after(timeout):
        while any(settings.paths.datasets.iterdir()):
            await anyio.sleep(0.05)


async def pause(store: EventStore) -> None:
    await store.append("daemon", [QueuePaused(by="test")])


async def test_defect04_new_drop_reusing_an_old_name_is_a_new_drop(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        await pause(daemon.store)
        drop_dataset(settings, "cats", seed=1)
        (first,) = await wait_drops(daemon.store, 1)
        await drop_folder_empty(settings)
    # The old stored copy is cleared away, and a different dataset arrives under the same
    # name while the daemon is down.
    shutil.rmtree(str(first["stored"]))
    drop_dataset(settings, "cats", seed=2)
    async with running_daemon(settings) as daemon:
        await drop_folder_empty(settings)
        drops = await list_drops(daemon.store)
        assert len(drops) == 2, f"the new cats was not taken as a new drop: {drops}"
        second = next(d for d in drops if d["id"] != first["id"])
        assert second["name"] == "cats" and second["state"] == "ingested"
        assert second["hash"] != first["hash"]
        assert Path(str(second["stored"])).is_dir()
        assert not Path(str(first["stored"])).exists()
        stages = [j.stage for j in await list_jobs(daemon.store) if j.drop_id == second["id"]]
        assert sorted(stages) == ["bucket", "cache", "train"]


def zipped(settings: Settings, name: str, toml: str, seed: int = 1) -> Path:
    source = write_dataset(settings.root / "src" / name, toml=toml, seed=seed)
    archive = settings.root / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.iterdir()):
            zf.write(path, f"{name}/{path.name}")
    return archive


async def test_defect07_rejected_and_duplicate_zips_leave_no_extraction(
    settings: Settings,
) -> None:
    extractions = settings.paths.work / "drops"
    async with running_daemon(settings) as daemon:
        await pause(daemon.store)  # the jobs are beside the point; no model is loaded
        good = zipped(settings, "good", SMALL)
        again = settings.root / "again" / "good.zip"
        again.parent.mkdir()
        shutil.copyfile(good, again)  # the same name and bytes: the same drop again
        good.rename(settings.paths.datasets / "good.zip")
        await drop_folder_empty(settings)
        bad_toml = zipped(settings, "badtoml", SMALL + "learning_rat = 0.1\n", seed=2)
        bad_toml.rename(settings.paths.datasets / "badtoml.zip")
        no_model = zipped(settings, "nomodel", SMALL + 'model = "no-such-model"\n', seed=3)
        no_model.rename(settings.paths.datasets / "nomodel.zip")
        await wait_drops(daemon.store, 3)
        await drop_folder_empty(settings)
        again.rename(settings.paths.datasets / "good.zip")
        found = await wait_drops(daemon.store, 4)
        drops = {d["name"]: d for d in found if d["state"] != "duplicate"}
        (duplicate,) = [d for d in found if d["state"] == "duplicate"]
        assert duplicate["duplicate_of"] == drops["good"]["id"]
        assert drops["badtoml"]["state"] == "failed"
        assert drops["nomodel"]["state"] == "failed"
        # Only the accepted zip keeps an extraction (its bucket job reads it).
        assert sorted(p.name for p in extractions.iterdir()) == [str(drops["good"]["id"])]
        reason = str(drops["badtoml"]["reason"])
        assert "badtoml.zip/badtoml/dataset.toml" in reason and "learning_rat" in reason
        assert str(settings.paths.work) not in reason
        note = (settings.paths.failed / "badtoml.zip.error.txt").read_text()
        assert str(settings.paths.work) not in note
