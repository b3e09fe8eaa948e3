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


def test_a_batch_record_on_the_records_thread_is_apart_from_the_device_threads_wait_for_it(
    tmp_path: Path,
) -> None:
    device = "thread (0x1): dropkiln-device_0;_run_stage (executor.py:1)"
    records = "thread (0x2): dropkiln-records_0;_worker (thread.py:1)"
    lines = [
        f"{records};DaemonContext.checkpoint (context.py:1);run (from_thread.py:1) 4",
        f"{device};GenerationRun.contact_sheet (run.py:3);BatchRecords.wait (b.py:1) 1",
        f"{device};GenerationRun.contact_sheet (run.py:3);PngWriter.settle (png_writer.py:1) 2",
    ]
    raw = tmp_path / "daemon.raw"
    raw.write_text("\n".join(lines) + "\n")
    parts = generation_parts(raw, turns=1)
    per_sample_ms = 1000 / RATE_HZ
    assert parts["records_thread"] == {"records (event round trips)": 4 * per_sample_ms}
    assert parts["device_thread"] == {
        "waiting for a batch's records (records thread)": 1 * per_sample_ms,
        "contact sheet (after the last PNG)": 2 * per_sample_ms,
    }
