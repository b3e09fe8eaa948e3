"""The optional wandb run: used only when installed and configured, offline by default."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from dataset_fixtures import make_dataset, mixed_images

from dropkiln.config import TrainSettings
from dropkiln.stages.bucket import BucketResult
from dropkiln.stages.cache import STAGE as CACHE
from dropkiln.stages.cache import CacheSpec
from dropkiln.stages.testing import LocalContext
from dropkiln.stages.train import STAGE, TrainSpec
from dropkiln.stages.training.wandb_run import open_wandb


def _train(root: Path, run: str, wandb_project: str) -> Path:
    manifest = make_dataset(root, "cats", mixed_images(2))
    cache_ctx = LocalContext(root=root, work_dir=root / "state" / "work" / "cache",
                             upstream_results={"bucket": BucketResult.of(manifest)})  # fmt: skip
    cached = CACHE.run(CacheSpec(name="cats"), cache_ctx)
    out = root / "outputs" / "loras" / run
    options = TrainSettings(steps=2, checkpoint_every=1, batch_size=1, rank=4,
                            validation_prompts=["a cat"], wandb_project=wandb_project)  # fmt: skip
    spec = TrainSpec(name="cats", model="tiny-sdxl", options=options, output_dir=str(out))
    ctx = LocalContext(root=root, work_dir=root / "state" / "work" / run,
                       upstream_results={"cache": cached})  # fmt: skip
    STAGE.run(spec, ctx)
    return out


def test_not_configured_no_run(tmp_path: Path) -> None:
    assert open_wandb("", tmp_path, "cats", "cats-1", {}) is None
    assert not (tmp_path / "wandb").exists()


def test_configured_but_not_installed_no_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert open_wandb("cats", tmp_path, "cats", "cats-1", {}) is None
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_configured_and_installed_writes_an_offline_run(
    dropkiln_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # a bogus server: were the run online, it could not reach it
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    out = _train(dropkiln_root, "with-wandb", wandb_project="cats")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "offline unless WANDB_MODE says otherwise"
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    # wandb's own record file holds what TensorBoard got: the scalars and the images
    for key in (b"loss/train", b"loss/validation", b"lr", b"grad_norm", b"validation/"):
        assert key in record, key
    assert (out / "tensorboard").is_dir() and (out / "cats.safetensors").is_file()
