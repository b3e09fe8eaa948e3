"""Shared fixtures: a dropkiln home in tmp_path with fast settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dropkiln.config import Settings

pytest_plugins = ["tests.postgres"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the random tiny-sdxl, the fastest model; tiny-shapes (the default for
# users) has its own tests, which name it.
os.environ.setdefault("DROPKILN_MODEL", "tiny-sdxl")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the long reliability suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu and not _cuda_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="long form: run with --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


def _cuda_available() -> bool:
    import torch  # only when gpu tests were collected: the CLI/store tests stay torch-free

    return bool(torch.cuda.is_available())


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    root = tmp_path / "home"
    # preempt at once: tests of preemption say so when they test preempt_after_s itself;
    # one torch thread: the suite shares the box with other work (README, torch_threads)
    s = Settings.load(
        root=root, settle_seconds=0.2, telemetry_every_s=0.2, preempt_after_s=0, torch_threads=1
    )
    s.paths.create()
    return s
