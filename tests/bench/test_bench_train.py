"""The train benchmark runs end to end on a tiny dataset (its figures are not asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropkiln.bench.train import bench_train


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from dropkiln.stages.models import ensure_tiny_model

    torch.set_num_threads(1)
    folder = tmp_path_factory.getbasetemp() / "bench-models"
    ensure_tiny_model("tiny-sdxl", folder)
    return folder


@pytest.mark.slow
def test_bench_train_reports_both_rates(bench_models: Path) -> None:
    figures = bench_train(steps=5, n_images=2, repeat=1, models_dir=bench_models)
    assert figures["stage_steps_per_s"] > 0
    assert figures["minimal_loop_steps_per_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["stage_steps_per_s"] / figures["minimal_loop_steps_per_s"], rel=0.02
    )
