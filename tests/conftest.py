"""Shared fixtures: a dropkiln home in tmp_path with fast settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dropkiln.config import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the long reliability suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="long form: run with --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    root = tmp_path / "home"
    # preempt at once: tests of preemption say so when they test preempt_after_s itself
    s = Settings.load(root=root, settle_seconds=0.2, telemetry_every_s=0.2, preempt_after_s=0)
    s.paths.create()
    return s
