"""The cache benchmark re-encodes exactly the changed image (its timings are not asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropkiln.bench.cache import bench_cache


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from dropkiln.stages.models import ensure_tiny_model

    torch.set_num_threads(1)
    folder = tmp_path_factory.getbasetemp() / "bench-models"
    ensure_tiny_model("tiny-sdxl", folder)
    return folder


def test_bench_cache_counts_one_changed_image(bench_models: Path) -> None:
    figures = bench_cache(n_images=4, repeat=1, models_dir=bench_models)
    assert figures["one_changed_encoded_reused"] == (1, 3)
    assert figures["images_per_s"] > 0
    assert figures["one_changed_ratio"] > 0
