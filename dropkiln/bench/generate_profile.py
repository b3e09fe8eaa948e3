"""Where a generate job's time goes in the daemon: py-spy samples of its device thread (and
of its PNG writer thread), cut into the job's parts.

``python -m dropkiln.bench.daemon --profile`` attaches ``py-spy record --idle`` to the
daemon for the warm drops. Idle samples are kept: the device thread waiting for the event
loop to commit its records, or for the writer thread, is time the job takes (between jobs it
waits in its pool: "other"). Each figure is the milliseconds a thread spent in that part,
per drop; a sample belongs to the first part whose function is on its stack, the
most specific first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dropkiln.bench.train_profile import RATE_HZ, seconds_by_part

DEVICE_THREAD = "dropkiln-device"
PNG_THREAD = "dropkiln-png"

GENERATE_PARTS = (
    # inside the pipeline call: what a clean script spends too
    ("step callback (progress, stop check)", "GenerationRun._on_step_end"),
    ("prompt encoding", ".encode_prompt ("),
    ("UNet", "UNet2DConditionModel.forward ("),
    ("scheduler step", "Scheduler.step ("),
    ("VAE decode", "AutoencoderKL.decode ("),
    ("to PIL", ".postprocess ("),
    ("pipeline, rest", "Pipeline.__call__ ("),
    # around it: the daemon's own work (records first: a batch's are made inside a settle)
    ("records (event round trips)", "DaemonContext."),
    ("waiting for a batch's records (records thread)", "BatchRecords.wait ("),
    ("contact sheet (after the last PNG)", "GenerationRun.contact_sheet ("),
    ("PNG encode + fsync (written here)", "PngWriter.help ("),
    ("waiting for the writer thread", "PngWriter.settle ("),
    ("infotext", "a1111_parameters ("),
    ("image records (digests)", "image_record ("),
    ("resume check (reads kept PNGs)", "_finished ("),
    ("pipeline for the task (memory rung)", "_pipeline_for ("),
    ("scheduler", "_use_scheduler ("),
    ("set-up (prompt file, model, LoRAs)", "run_generate ("),
    ("torch set-up", "prepare_torch ("),
)
RECORDS_THREAD = "dropkiln-records"
RECORDS_PARTS = (("records (event round trips)", "DaemonContext."),)
"""A batch's checkpoint, committed there while the next batch denoises."""
WRITER_PARTS = (
    ("thumbnail", "sheet_thumbnail ("),
    ("contact sheet", "contact_sheet ("),
    ("PNG encode", "png_bytes ("),
    ("write + fsync", "write_atomic ("),
)


def generation_parts(raw: Path, turns: int) -> dict[str, Any]:
    """Milliseconds per drop in each part, for each thread, over ``turns`` warm drops."""

    def per_drop(seconds: dict[str, float]) -> dict[str, float]:
        return {part: round(1000 * value / turns, 1) for part, value in seconds.items()}

    return {
        "note": f"ms per drop, py-spy samples at {RATE_HZ} Hz (idle kept; 'other' is mostly "
        f"the device thread waiting for its next job) over {turns} warm drops",
        "device_thread": per_drop(seconds_by_part(raw, DEVICE_THREAD, GENERATE_PARTS)),
        "png_writer_thread": per_drop(seconds_by_part(raw, PNG_THREAD, WRITER_PARTS)),
        "records_thread": per_drop(seconds_by_part(raw, RECORDS_THREAD, RECORDS_PARTS)),
    }


def start_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record --idle`` of process ``pid`` into ``out`` (raw stacks); None without
    py-spy."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return None
    command = [spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw",
               "--threads", "--idle", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
