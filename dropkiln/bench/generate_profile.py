"""Where a generate job's time goes in the daemon: py-spy samples of its device thread (and
of its PNG writer thread), cut into the job's parts.

``python -m dropkiln.bench.daemon --profile`` attaches ``py-spy record`` (train_profile.py)
to the daemon for the warm drops; idle samples are not recorded, so each figure is the
seconds a thread spent in that part over all of them. A sample belongs to the first part
whose function is on its stack, the most specific first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dropkiln.bench.train_profile import seconds_by_part

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
    # around it: the daemon's own work
    ("PNG encode + fsync (written here)", "PngWriter.help ("),
    ("waiting for the writer thread", "PngWriter.settle ("),
    ("contact sheet", "contact_sheet ("),
    ("records (event round trips)", "DaemonContext."),
    ("infotext", "a1111_parameters ("),
    ("image records (digests)", "image_record ("),
    ("resume check (reads kept PNGs)", "_finished ("),
    ("pipeline for the task (memory rung)", "_pipeline_for ("),
    ("scheduler", "_use_scheduler ("),
    ("set-up (prompt file, model, LoRAs)", "run_generate ("),
    ("torch set-up", "prepare_torch ("),
)
WRITER_PARTS = (
    ("thumbnail", "sheet_thumbnail ("),
    ("contact sheet", "contact_sheet ("),
    ("PNG encode", "png_bytes ("),
    ("write + fsync", "write_atomic ("),
)


def generation_parts(raw: Path, turns: int) -> dict[str, Any]:
    """Seconds per part of each thread, over ``turns`` warm drops."""
    return {
        "note": f"py-spy samples of the daemon over {turns} warm drops, idle time left out",
        "device_thread": seconds_by_part(raw, DEVICE_THREAD, GENERATE_PARTS),
        "png_writer_thread": seconds_by_part(raw, PNG_THREAD, WRITER_PARTS),
    }
