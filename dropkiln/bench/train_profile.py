"""Where a whole train job's time goes, in the daemon and in the clean script: py-spy samples
of the thread doing the torch work, cut into the job's parts.

``python -m dropkiln.bench.train_daemon --profile`` attaches ``py-spy record`` (install it
with ``pip install py-spy``; it needs ptrace rights over the processes) to the daemon and to
the clean process for the whole run, then reads the raw stacks here. A sample belongs to the
first part whose function is on its stack; the figures are seconds (samples at RATE_HZ).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

RATE_HZ = 50

DAEMON_PARTS = (
    # (part, a function on the stack), first match wins: the most specific first
    ("validation images", "validation_images ("),
    ("validation loss", "TrainingLoop.measure_validation_loss ("),
    ("loss plot", "write_loss_plot ("),
    ("contact sheet", "validation_sheet ("),
    ("step LoRA files", "LoraExports.write_step ("),
    ("final LoRA files", "LoraExports.write ("),
    ("diffusers-format export", "write_diffusers ("),
    ("training state", "TrainingSession.save ("),
    ("TensorBoard", "RunTracker."),
    ("steps", "TrainingLoop.train_step ("),
    ("events", "DaemonContext."),
    # once a daemon: torch's import at the first job, the model's load (warm after)
    ("torch import", "DeviceThread.prepare_torch ("),
    ("model load", "load_pipeline ("),
    ("imports (first train job)", "_find_and_load ("),
    ("set-up (dataset, adapters)", "run_train ("),
    ("cache job", "run_cache ("),
    ("bucket job", "run_bucket ("),
)
IDLE_LEAF = "_worker (concurrent/futures/thread.py"
"""The device thread's pool waiting for its next call (py-spy takes a thread just woken, or
waiting for a core on a loaded box, for active)."""
CLEAN_PARTS = (
    ("validation images", "validation_image ("),
    ("validation loss", "validation_loss ("),
    ("checkpoint files", "save_files ("),
    ("steps", "train_step ("),
    ("encode (not timed)", "encode ("),
    ("model load", "from_pretrained ("),
)


def start_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of process ``pid`` into ``out`` (raw stacks); None without py-spy."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(_python_bin())))
    if spy is None:
        return None
    command = [spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw",
               "--threads", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_spy(spy: subprocess.Popen[bytes] | None) -> None:
    """py-spy writes its file when interrupted."""
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def seconds_by_part(raw: Path, thread: str, parts: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """Seconds of the threads whose name starts with ``thread`` in each part ("other": none;
    "idle": the device thread's pool waiting between calls)."""
    counts: Counter[str] = Counter()
    if not raw.is_file():
        return {}
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or not frames[0].split(": ", 1)[-1].startswith(thread):
            continue
        part = next((name for name, needle in parts if needle in stack), "other")
        if part == "other" and frames[-1].startswith(IDLE_LEAF):
            part = "idle (between calls)"
        counts[part] += int(number)
    return {part: round(count / RATE_HZ, 2) for part, count in counts.most_common()}


def _python_bin() -> str:
    import sys

    return str(Path(sys.executable).parent)
