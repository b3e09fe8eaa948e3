"""Pinning a drop to a device class: the planner puts the pin on the drop's GPU jobs only,
and the job's row (``status --json``) shows it."""

from __future__ import annotations

from pathlib import Path

from dropkiln.config import Settings
from dropkiln.daemon.drops import ParsedDrop
from dropkiln.daemon.planner import Planner
from dropkiln.options import BucketSettings, TrainSettings
from dropkiln.stages.dataset import DatasetOptions
from dropkiln.store.vocabulary import DropKind, Lane


def dataset_drop(folder: Path, device_class: str | None) -> ParsedDrop:
    options = DatasetOptions(
        "tiny-sdxl", BucketSettings(), TrainSettings(), device_class=device_class
    )
    return ParsedDrop(DropKind.DATASET, "cats", "0" * 64, 1, 1, folder, options)


async def test_a_pinned_dataset_pins_its_gpu_jobs_and_leaves_bucketing_free(
    settings: Settings, tmp_path: Path
) -> None:
    planner = Planner(settings, None)  # type: ignore[arg-type]  # datasets never read it
    jobs = await planner.plan(dataset_drop(tmp_path, "24gb"), "drop-1")
    pins = {job.stage: (job.lane, job.device_class) for job in jobs}
    assert pins == {
        "bucket": (Lane.CPU, None),  # any executor may bucket: it never touches the GPU
        "cache": (Lane.GPU, "24gb"),
        "train": (Lane.GPU, "24gb"),
    }
    unpinned = await planner.plan(dataset_drop(tmp_path, None), "drop-2")
    assert {job.device_class for job in unpinned} == {None}


def test_an_old_job_submitted_event_reads_as_unpinned() -> None:
    from dropkiln.store.events import JobSubmitted

    old = {
        "job_id": "j",
        "stage": "train",
        "name": "n",
        "lane": "gpu",
        "priority": 0,
        "spec": {},
    }
    assert JobSubmitted.model_validate(old).device_class is None
