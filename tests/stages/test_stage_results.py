"""Stage results: recorded as JSON with JobSucceeded, read back by the next job's stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropkiln.stages.base import StageError
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.bucket_manifest import Rejection
from dropkiln.stages.testing import LocalContext

RECORDED = {
    "manifest": "/kiln/state/work/1/manifest.json",
    "images": 3,
    "rejected": 1,
    "buckets": {"64x64": 3},
    "rejections": [{"path": "notes.md", "reason": "not used: .md is not an image type"}],
}


def _reading(tmp_path: Path, recorded: dict[str, object]) -> LocalContext:
    return LocalContext(root=tmp_path, work_dir=tmp_path, upstream_results={"bucket": recorded})


def test_a_recorded_result_is_read_back_as_its_model(tmp_path: Path) -> None:
    result = BucketResult.upstream(_reading(tmp_path, RECORDED), "bucket")
    assert result.manifest == RECORDED["manifest"]
    assert result.rejections == [
        Rejection(path="notes.md", reason=RECORDED["rejections"][0]["reason"])
    ]  # type: ignore[index]
    assert result.model_dump(mode="json") == RECORDED


def test_keys_another_version_recorded_are_ignored(tmp_path: Path) -> None:
    newer = {**RECORDED, "seconds": 1.5}
    assert BucketResult.upstream(_reading(tmp_path, newer), "bucket").images == 3


def test_a_result_missing_what_the_stage_needs_names_it(tmp_path: Path) -> None:
    older = {key: value for key, value in RECORDED.items() if key != "manifest"}
    with pytest.raises(StageError, match="the bucket job's result cannot be used: manifest: Field"):
        BucketResult.upstream(_reading(tmp_path, older), "bucket")
