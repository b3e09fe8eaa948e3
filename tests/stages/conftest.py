"""Shared fixtures for the model, cache and train stage tests: tiny models built once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with both tiny models built (once per test session)."""
    import torch

    from dropkiln.stages.models import ensure_tiny_model

    # Tests share two busy cores: one intra-op thread avoids OpenMP spin contention,
    # which makes tiny-model steps ten times slower under load.
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("models")
    ensure_tiny_model("tiny-sdxl", folder)
    ensure_tiny_model("tiny-sd15", folder)
    return folder


@pytest.fixture
def dropkiln_root(tmp_path: Path, models_dir: Path) -> Path:
    """A dropkiln ROOT whose state/models is the session's models folder."""
    root = tmp_path / "root"
    (root / "state").mkdir(parents=True)
    (root / "state" / "models").symlink_to(models_dir, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def miniatures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real-topology SDXL and SD 1.5 miniatures (tests/stages/miniatures.py), built once."""
    import torch
    from miniatures import build_miniature

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("miniatures")
    return {kind: build_miniature(kind, folder / kind) for kind in ("sdxl", "sd15")}
