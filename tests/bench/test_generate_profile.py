"""The daemon profile's parts: a record made inside a settle is a record, not a wait; the
contact sheet's wait after the last PNG is apart from the waits before it."""

from __future__ import annotations

from pathlib import Path

from dropkiln.bench.generate_profile import generation_parts
from dropkiln.bench.train_profile import RATE_HZ


def test_parts_name_records_inside_a_settle_and_keep_the_sheet_apart(tmp_path: Path) -> None:
    device = "thread (0x1): dropkiln-device_0;_run_stage (executor.py:1)"
    stacks = {
        "GenerationRun.render_images (run.py:1);PngWriter.settle (png_writer.py:1);"
        "GenerationRun._checkpoint_batch (run.py:2);DaemonContext.checkpoint (context.py:1)": 5,
        "GenerationRun.render_images (run.py:1);PngWriter.settle (png_writer.py:1);"
        "wait (futures.py:1)": 3,
        "GenerationRun.contact_sheet (run.py:3);PngWriter.settle (png_writer.py:1)": 2,
        "StableDiffusionXLPipeline.__call__ (p.py:1);UNet2DConditionModel.forward (u.py:1)": 10,
    }
    raw = tmp_path / "daemon.raw"
    raw.write_text("".join(f"{device};{stack} {count}\n" for stack, count in stacks.items()))
    parts = generation_parts(raw, turns=2)["device_thread"]
    per_sample_ms = 1000 / RATE_HZ / 2
    assert parts == {
        "UNet": 10 * per_sample_ms,
        "records (event round trips)": 5 * per_sample_ms,
        "waiting for the writer thread": 3 * per_sample_ms,
        "contact sheet (after the last PNG)": 2 * per_sample_ms,
    }
