"""Left-overs of writes that a killed daemon never finished.

Outputs and state files are written under a hidden temporary name and renamed into place
(``atomic_path``: ``.NAME.RANDOM.part``; staging folders for LoRA exports, unzipped
datasets and built models).
A SIGKILL or a power cut in between leaves the temporary behind. It is never taken for an
output, but it is litter in the user's outputs folder that grows with every crash (a
half-encoded video, a half-saved model). When the daemon starts no job is running yet, so
every such left-over belongs to a dead process.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dropkiln.config import Paths

log = logging.getLogger(__name__)


def is_leftover(name: str, is_dir: bool, in_outputs: bool) -> bool:
    if not name.startswith("."):
        return False
    # Outputs hold nothing hidden but temporaries; in state/, atomic_path's and unzipping.
    return in_outputs or name.endswith(".unzip" if is_dir else ".part")


def sweep_leftovers(paths: Paths) -> list[Path]:
    """Remove the temporaries of unfinished writes; returns what was removed."""
    removed: list[Path] = []
    tops = [(paths.outputs, True), (paths.cache, False), (paths.work, False)]
    tops.append((paths.checkpoints, False))
    for top, in_outputs in tops:
        for folder, dirs, files in os.walk(top):
            if Path(folder) == paths.bench:
                dirs.clear()  # `dropkiln bench` may be writing there right now
                continue
            for name in [d for d in dirs if is_leftover(d, True, in_outputs)]:
                dirs.remove(name)
                shutil.rmtree(Path(folder, name), ignore_errors=True)
                removed.append(Path(folder, name))
            for name in files:
                if is_leftover(name, False, in_outputs):
                    try:
                        Path(folder, name).unlink(missing_ok=True)
                    except OSError as exc:
                        # Litter that cannot be removed is no reason not to start.
                        log.warning("could not remove %s: %s", Path(folder, name), exc)
                        continue
                    removed.append(Path(folder, name))
    if paths.models.is_dir():
        # A model built for the first time is staged in a hidden folder beside its place.
        for entry in paths.models.iterdir():
            if entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    for path in removed:
        log.info("removed %s, left by an unfinished write", path)
    return removed
