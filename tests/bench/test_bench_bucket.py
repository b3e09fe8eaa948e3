"""The bucket benchmark runs end to end on a tiny dataset (its figures are not asserted)."""

from __future__ import annotations

from dropkiln.bench.bucket import bench_bucket, main


def test_bench_bucket_reports_rates_and_identical_manifests() -> None:
    figures = bench_bucket(n_images=4, size=(96, 64), workers=[1, 2], repeat=1)
    assert [run["workers"] for run in figures["runs"]] == [1, 2]
    assert all(run["images_per_s"] > 0 for run in figures["runs"])
    assert figures["speedup"] > 0
    assert figures["same_manifest"] is True


def test_bench_bucket_prints_a_table(capsys) -> None:
    main(["2", "64", "48"])
    out = capsys.readouterr().out
    assert "bucket stage: 2 JPEGs of 64x48" in out
    assert "speedup" in out
