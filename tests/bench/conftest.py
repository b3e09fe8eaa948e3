"""A home whose models folder holds the tiny models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from dropkiln.stages.models import ensure_tiny_model

    torch.set_num_threads(1)
    folder = tmp_path_factory.getbasetemp() / "bench-models"
    ensure_tiny_model("tiny-sdxl", folder)
    return folder


@pytest.fixture
def bench_home(tmp_path: Path, tiny_models: Path) -> Path:
    """ROOT with state/models pointing at the session's tiny models."""
    root = tmp_path / "home"
    (root / "state").mkdir(parents=True)
    (root / "state" / "models").symlink_to(tiny_models, target_is_directory=True)
    return root
