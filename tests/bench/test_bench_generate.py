"""The generate and video benchmarks run end to end on tiny settings (figures not asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dropkiln.bench.generate import bench_generate
from dropkiln.bench.video import bench_video


@pytest.fixture(scope="session")
def bench_generate_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from dropkiln.stages.models import ensure_tiny_model

    torch.set_num_threads(1)
    folder = tmp_path_factory.getbasetemp() / "bench-models"
    ensure_tiny_model("tiny-sdxl", folder)
    return folder


@pytest.mark.slow
def test_bench_generate_reports_ratios(bench_generate_models: Path) -> None:
    figures = bench_generate(images=1, size=64, steps=2, repeat=1, files=1, file_images=1,
                             models_dir=bench_generate_models)  # fmt: skip
    overhead, warm = figures["overhead"], figures["warm_vs_processes"]
    assert overhead["ratio_vs_direct"] == pytest.approx(
        overhead["stage_s"] / overhead["direct_s"], rel=0.05
    )
    assert warm["speedup"] == pytest.approx(
        warm["process_per_file_s"] / warm["warm_stage_s"], rel=0.05
    )


def test_bench_video_reports_a_ratio() -> None:
    figures = bench_video(images=2, size=64, fps=4, seconds_per_image=1.0, repeat=1)
    assert figures["frames"] == 8
    assert figures["ratio"] == pytest.approx(figures["stage_s"] / figures["in_memory_s"], rel=0.05)


@pytest.mark.slow
def test_bench_batched_renders_the_same_images_as_diffusers_batched(
    bench_generate_models: Path, tmp_path: Path
) -> None:
    from dropkiln.bench.cache import link_models
    from dropkiln.bench.generate_batch import bench_batched

    link_models(tmp_path, bench_generate_models)
    figures = bench_batched(tmp_path, images=4, batch=2, size=64, steps=2, repeat=1)
    assert figures["same_files_as_direct_batched"] is True  # pixels and infotext
    outside = figures["outside_pipeline_s"]  # the warm-up and one run, each side
    assert len(outside["stage"]) == len(outside["direct"]) == 2 and min(outside["direct"]) > 0
    assert figures["ratio_vs_direct_batched"] == pytest.approx(
        figures["stage_batched_images_per_s"] / figures["direct_batched_images_per_s"], rel=0.05
    )
