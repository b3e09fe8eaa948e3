"""A full disk while writing a cache shard, a checkpoint, an image or a video frame.

The job fails with a reason that says the disk is full, nothing half-written is left where
an output or a checkpoint is looked for, and once there is room again ``dropkiln retry``
resumes the job and the outputs are the undisturbed run's, bit for bit.

Injected (``enospc@POINT``, everywhere) and real (a small tmpfs mounted over part of ROOT,
when this process may mount: root in a sandbox; otherwise that test is skipped).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import Reference
from tests.reliability.home import TERMINAL, Home
from tests.reliability.pipeline import (
    JOBS,
    DropsPrompts,
    PromptDropper,
    assert_outputs_whole,
    assert_same_outputs,
    collect_outputs,
    drop_dataset,
    drop_prompt_file,
)

pytestmark = pytest.mark.slow

DISK_FULL = ("No space left on device", "os error 28")
ENOSPC_POINTS = (
    "enospc@cache.batch:2",
    "enospc@train.checkpoint:2",
    "enospc@generate.image:2",
    "enospc@video.frame:3",
)
"""The fault points right before a write: a shard batch, a checkpoint, an image, a frame."""


def _all_ended(prompts: DropsPrompts) -> Callable[[Home], bool]:
    def ended(home: Home) -> bool:
        prompts.poll(home)
        jobs = home.jobs()
        failed = any(job["state"] == "failed" for job in jobs)
        return (len(jobs) >= JOBS or failed) and all(job["state"] in TERMINAL for job in jobs)

    return ended


def retry_until_done(
    home: Home, prompts: DropsPrompts, fix: Callable[[dict[str, Any]], None] | None = None
) -> list[str]:
    """Wait for every job to end; retry the job the full disk failed (after ``fix(job)``
    made room) until none is left; returns the stages retried, in order."""
    retried: list[str] = []
    while True:
        home.wait_for(_all_ended(prompts), 240, "every job to end")
        jobs = home.jobs()
        full = [j for j in jobs if j["state"] == "failed" and "dependency" not in j["error"]]
        if not full:
            return retried
        job = full[0]
        assert any(text in job["error"] for text in DISK_FULL), (job["stage"], job["error"])
        stray = [p for p in (home.root / "outputs").rglob("*") if p.name.startswith(".")]
        assert not stray, f"a failed write left {stray}"
        if fix is not None:
            fix(job)
        before = home.last_seq()
        result = home.cli("retry", job["id"])
        assert result.returncode == 0, result.stderr
        home.wait_for(_requeued_after(before), 30, "the daemon to take the retry")
        retried.append(job["stage"])


def _requeued_after(seq: int) -> Callable[[Home], bool]:
    def requeued(home: Home) -> bool:
        return any(event["type"] == "JobQueued" for event in home.events(seq))

    return requeued


def test_disk_full_at_every_write_point_fails_cleanly_and_retry_resumes(
    home: Home, reference_outputs: Reference
) -> None:
    reference = reference_outputs()
    prompts = PromptDropper()
    drop_dataset(home)
    home.start(faults=",".join(ENOSPC_POINTS))
    home.wait_serving()
    retried = retry_until_done(home, prompts)
    assert retried == ["cache", "train", "generate", "video"]
    assert home.terminate() == 0
    jobs = home.jobs()
    for job in jobs:
        kinds = [e["type"] for e in home.events_of(job["id"])]
        assert kinds.count("JobSucceeded") == 1, (job["stage"], kinds)
    assert_retried_outputs(home, jobs, reference)


def assert_retried_outputs(home: Home, jobs: list[dict[str, Any]], reference: Any) -> None:
    """``assert_finished_once``, allowing for the failed attempts the retries ended."""
    assert [j["state"] for j in jobs] == ["succeeded"] * JOBS
    check = home.cli("store", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert_outputs_whole(home.root, jobs)
    assert_same_outputs(collect_outputs(home.root), reference)


# A real full disk ---------------------------------------------------------------------------

PAGE = 4096


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


def _usage(folder: Path) -> int:
    """Bytes a tmpfs would charge for the files under ``folder``."""
    return sum(_pages(f.stat().st_size) for f in folder.rglob("*") if f.is_file())


def _cannot_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = Path(tempfile.mkdtemp(prefix="dropkiln-tmpfs-probe-"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            return f"cannot mount a tmpfs here: {done.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted over ``folder`` (empty before), with a filler file
    to leave exactly as much room as a test wants."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={_pages(size)}", "tmpfs", str(folder)],
            check=True,
        )
        self.filler = folder / "filler.bin"

    def free(self) -> int:
        stat = os.statvfs(self.folder)
        return stat.f_bavail * stat.f_frsize

    def leave_free(self, room: int) -> None:
        self.filler.write_bytes(bytes(max(0, self.free() - _pages(room))))

    def make_room(self, size: int = 64 * 2**20) -> None:
        self.filler.unlink(missing_ok=True)
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.folder)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.folder)], check=False)


class DropPromptsOnAFullerDisk:
    """Once the LoRA is trained, fill the outputs disk to leave room for about one and a half
    images, then drop the prompt file (so the second image cannot be written)."""

    def __init__(self, outputs: SmallDisk, image_bytes: int) -> None:
        self.outputs = outputs
        self.image_bytes = image_bytes
        self.dropped = False

    def poll(self, home: Home) -> None:
        trained = any(j["stage"] == "train" and j["state"] == "succeeded" for j in home.jobs())
        if trained and not self.dropped:
            self.outputs.leave_free(self.image_bytes * 3 // 2)
            drop_prompt_file(home)
            self.dropped = True


@pytest.mark.outputs_gone_after
@pytest.mark.skipif(bool(_cannot_mount()), reason=str(_cannot_mount()))
def test_a_real_full_disk_fails_cleanly_and_no_damaged_file_is_taken_for_a_good_one(
    home: Home, reference_outputs: Reference
) -> None:
    """The cache, the checkpoints and the outputs each on a small tmpfs that fills up.

    Before each retry, a damaged file is left where a good one is looked for (as a torn
    write or a bad disk would): a truncated cache shard, a truncated checkpoint, a truncated
    image. Each must be made again, not used.
    """
    reference = reference_outputs()
    ref = reference.root
    latents = _usage(ref / "state" / "cache" / "latents")
    text_shard = max(
        _pages(f.stat().st_size) for f in (ref / "state" / "cache" / "text").rglob("*.safetensors")
    )
    # one checkpoint (the folder keeps the newest two)
    checkpoint = max(
        _usage(f) for f in next((ref / "state" / "work").glob("*/checkpoints")).iterdir()
    )
    small_files = sum(_pages(f.stat().st_size) for f in (ref / "state" / "work").glob("*/*.json"))
    image = max(_pages(f.stat().st_size) for f in (ref / "outputs" / "images").rglob("0*.png"))
    disks = []
    try:
        cache = SmallDisk(home.root / "state" / "cache", latents + text_shard // 2)
        disks.append(cache)
        work = SmallDisk(home.root / "state" / "work", 64 * 2**20)
        disks.append(work)
        work.leave_free(small_files + checkpoint * 3 // 2)
        outputs = SmallDisk(home.root / "outputs", 64 * 2**20)
        disks.append(outputs)
        drop_dataset(home)
        home.start()
        home.wait_serving()
        made_again: dict[str, Path] = {}

        def damage_and_make_room(job: dict[str, Any]) -> None:
            if job["stage"] == "cache":
                cache.make_room()
                shard = sorted((home.root / "state" / "cache" / "latents").rglob("*.safetensors"))[
                    0
                ]
                truncate(shard)
                made_again["cache"] = shard
            elif job["stage"] == "train":
                work.make_room()
                saved = job["checkpoint"]
                assert saved is not None and saved["step"] == 2, saved
                tensors = (
                    home.root
                    / "state"
                    / "work"
                    / job["id"]
                    / saved["checkpoint"]
                    / "tensors.safetensors"
                )
                truncate(tensors)
            elif job["stage"] == "generate":
                outputs.make_room()
                written = sorted(Path(job["spec"]["output_dir"]).glob("0*.png"))
                assert len(written) == 1, written
                truncate(written[0])
                made_again["generate"] = written[0]

        retried = retry_until_done(
            home, DropPromptsOnAFullerDisk(outputs, image), damage_and_make_room
        )
        assert retried == ["cache", "train", "generate"]
        jobs = {job["stage"]: job for job in home.jobs()}
        assert jobs["cache"]["result"]["encoded"] == 1  # the damaged shard, made again
        assert jobs["generate"]["result"]["rendered"] == 4  # the damaged image too
        assert home.terminate() == 0
        assert_retried_outputs(home, list(jobs.values()), reference)
        # While the small disks still hold them: every recorded output as recorded.
        check = home.cli("store", "check")
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        home.stop()
        for disk in reversed(disks):
            disk.unmount()


def truncate(path: Path) -> None:
    """Keep the first half of a file, as a write cut short would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
