"""Drops through a real daemon: good ones are planned, bad ones land in failed/ with a reason."""

from __future__ import annotations

import os
import sqlite3
import zipfile
from pathlib import Path

import anyio

from dropkiln.config import Settings
from dropkiln.store import EventStore, list_drops, list_jobs
from tests.daemon.harness import ended, running_daemon, wait_job
from tests.samples import write_dataset

SMALL = "resolution = 64\nbucket_step = 32\nmin_side = 32\nmax_side = 128\n"


def drop_dataset(settings: Settings, name: str, **kwargs: object) -> Path:
    staging = settings.root / "staging" / name
    write_dataset(staging, toml=kwargs.pop("toml", SMALL), **kwargs)  # type: ignore[arg-type]
    target = settings.paths.datasets / name
    staging.rename(target)
    return target


async def wait_drops(store: EventStore, count: int, timeout: float = 20) -> list[dict[str, object]]:
    """Until ``count`` drops are recorded and moved out of the drop folder."""
    with anyio.fail_after(timeout):
        while len(drops := await list_drops(store)) < count or any(
            Path(str(drop["source"])).exists() for drop in drops
        ):
            await anyio.sleep(0.05)
    return drops


async def test_a_dataset_folder_is_moved_to_processed_and_bucketed(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        drop_dataset(settings, "cats")
        (drop,) = await wait_drops(daemon.store, 1)
        assert drop["state"] == "ingested"
        assert not (settings.paths.datasets / "cats").exists()
        stored = Path(str(drop["stored"]))
        assert stored.parent == settings.paths.processed and (stored / "img00.png").exists()
        (job,) = [j for j in await list_jobs(daemon.store) if j.stage == "bucket"]
        job = await wait_job(daemon.store, job.id, ended)
        assert job.state == "succeeded", job.error
        assert job.result is not None and job.result["images"] == 4
        assert Path(job.result["manifest"]).is_file()


async def test_bad_dataset_toml_goes_to_failed_with_a_reason_and_the_next_drop_works(
    settings: Settings,
) -> None:
    async with running_daemon(settings) as daemon:
        drop_dataset(settings, "broken", toml=SMALL + "learning_rat = 0.1\n")
        (drop,) = await wait_drops(daemon.store, 1)
        assert drop["state"] == "failed"
        assert "learning_rat" in str(drop["reason"])
        failed = settings.paths.failed / "broken"
        assert (failed / "img00.png").exists()
        note = (settings.paths.failed / "broken.error.txt").read_text()
        assert "learning_rat" in note and "Drop id" in note
        drop_dataset(settings, "good")
        drops = await wait_drops(daemon.store, 2)
        assert {d["name"]: d["state"] for d in drops} == {"broken": "failed", "good": "ingested"}


async def test_zip_dataset_is_extracted_and_a_zip_slip_is_refused(settings: Settings) -> None:
    source = write_dataset(settings.root / "src" / "dogs", toml=SMALL)
    archive = settings.root / "dogs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.iterdir()):
            zf.write(path, f"dogs/{path.name}")
    evil = settings.root / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escaped.txt", "gotcha")
    async with running_daemon(settings) as daemon:
        os.rename(archive, settings.paths.datasets / "dogs.zip")
        os.rename(evil, settings.paths.datasets / "evil.zip")
        drops = {d["name"]: d for d in await wait_drops(daemon.store, 2)}
        assert drops["evil"]["state"] == "failed"
        assert (settings.paths.failed / "evil.zip").exists()
        assert not (settings.root.parent / "escaped.txt").exists()
        assert drops["dogs"]["state"] == "ingested"
        (job,) = [j for j in await list_jobs(daemon.store) if j.stage == "bucket"]
        job = await wait_job(daemon.store, job.id, ended)
        assert job.state == "succeeded", job.error
        assert job.result is not None and job.result["images"] == 4


async def test_same_content_twice_is_recognised_and_kept(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        drop_dataset(settings, "one", seed=1)
        await wait_drops(daemon.store, 1)
        staging = write_dataset(settings.root / "staging" / "again", toml=SMALL, seed=1)
        staging.rename(settings.paths.datasets / "again")
        drops = {d["name"]: d for d in await wait_drops(daemon.store, 2)}
        assert drops["again"]["state"] == "duplicate"
        assert drops["again"]["duplicate_of"] == drops["one"]["id"]
        assert Path(str(drops["again"]["stored"])).exists()
        assert len([j for j in await list_jobs(daemon.store) if j.stage == "bucket"]) == 1


async def test_symlink_out_of_the_drop_and_a_non_prompt_file_are_rejected(
    settings: Settings,
) -> None:
    secret = settings.root / "secret.png"
    secret.write_bytes(b"not yours")
    staging = write_dataset(settings.root / "staging" / "sneaky", toml=SMALL)
    (staging / "link.png").symlink_to(secret)
    async with running_daemon(settings) as daemon:
        staging.rename(settings.paths.datasets / "sneaky")
        (settings.paths.prompts / "photo.png").write_bytes(b"\x89PNG")
        drops = {d["name"]: d for d in await wait_drops(daemon.store, 2)}
        assert drops["sneaky"]["state"] == "failed"
        assert "symlink" in str(drops["sneaky"]["reason"])
        assert drops["photo.png"]["state"] == "failed"
        assert "not a prompt file" in str(drops["photo.png"]["reason"])
        assert secret.read_bytes() == b"not yours"


async def test_a_dataset_of_only_broken_images_fails_its_bucket_job_with_reasons(
    settings: Settings,
) -> None:
    folder = settings.root / "staging" / "junk"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_bytes(b"this is not a jpeg")
    async with running_daemon(settings) as daemon:
        folder.rename(settings.paths.datasets / "junk")
        await wait_drops(daemon.store, 1)
        jobs = {j.stage: j for j in await list_jobs(daemon.store)}
        job = await wait_job(daemon.store, jobs["bucket"].id, ended)
        assert job.state == "failed"
        assert job.error is not None and "no usable image" in job.error
        train = await wait_job(daemon.store, jobs["train"].id, ended)
        assert train.state == "failed" and "dependency" in str(train.error)


async def test_an_interrupted_move_is_finished_at_the_next_start(settings: Settings) -> None:
    async with running_daemon(settings) as daemon:
        drop_dataset(settings, "moved")
        (drop,) = await wait_drops(daemon.store, 1)
    # Simulate a kill between the commit and the rename: put the drop back, and take away
    # the DropMoved that a killed daemon would not have written.
    stored = Path(str(drop["stored"]))
    stored.rename(settings.paths.datasets / "moved")
    with sqlite3.connect(settings.paths.db) as conn:
        conn.execute("DELETE FROM events WHERE type = 'DropMoved'")
    async with running_daemon(settings) as daemon:
        assert stored.exists()
        assert not (settings.paths.datasets / "moved").exists()
        assert len(await list_drops(daemon.store)) == 1
