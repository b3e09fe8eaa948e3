"""Phase timelines from hooks, and peak memory."""

from __future__ import annotations

import time

import pytest

from dropkiln.bench.memory import MemoryWatch
from dropkiln.bench.phases import (
    PhaseTimeline,
    generation_phase_rows,
    phase_summary,
    training_phase_rows,
)


def test_training_phases_come_from_module_and_optimizer_hooks() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with PhaseTimeline() as timeline:
        timeline.watch_module("unet", model)
        timeline.watch_optimizer_steps()
        timeline.mark()
        for _ in range(4):
            time.sleep(0.002)  # the "data" phase
            loss = model(torch.randn(8, 16)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    rows = training_phase_rows(timeline, skip=1)
    assert len(rows) == 3
    for row in rows:
        assert row["data"] >= 0.002
        assert row["forward"] > 0 and row["optimizer"] > 0 and row["backward"] >= 0
    # after remove(), nothing is recorded any more
    spans = len(timeline.spans)
    model(torch.randn(1, 16))
    optimizer.step()
    assert len(timeline.spans) == spans
    summary = phase_summary(rows, ("data", "forward", "backward", "optimizer"))
    assert summary["iterations"] == 3
    assert sum(summary["share"].values()) == pytest.approx(1, abs=0.01)


def test_generation_phases_split_each_image() -> None:
    timeline = PhaseTimeline()
    timeline.marks = [0.0, 1.0, 2.0]
    timeline.spans = [
        ("text_encode", 0.0, 0.1),
        ("unet", 0.1, 0.2),
        ("unet", 0.3, 0.6),
        ("vae_decode", 0.6, 0.8),
        ("unet", 1.1, 1.5),
    ]
    first, second = generation_phase_rows(timeline)
    assert first["text_encode"] == pytest.approx(0.1)
    assert first["denoise"] == pytest.approx(0.5)  # first UNet call to last, scheduler included
    assert first["vae_decode"] == pytest.approx(0.2)
    assert first["other"] == pytest.approx(0.2)
    assert second["denoise"] == pytest.approx(0.4) and second["vae_decode"] == 0


def test_memory_watch_sees_a_peak() -> None:
    with MemoryWatch() as watch:
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        time.sleep(0.1)
        del block
    report = watch.report()
    assert report["rss_peak_bytes"] >= report["rss_start_bytes"] + 60 * 2**20
    assert report["process_max_rss_bytes"] >= report["rss_peak_bytes"] * 0.9
    assert "cuda_peak_allocated_bytes" not in report
