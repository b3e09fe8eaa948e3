"""Left-overs of writes that a killed daemon never finished.

Outputs and state files are written under a hidden temporary name and renamed into place
(``atomic_path``: ``.NAME.RANDOM.part``; staging folders for LoRA exports, unzipped
datasets and built models).
A SIGKILL or a power cut in between leaves the temporary behind. It is never taken for an
output, but it is litter in the user's outputs folder that grows with every crash (a
half-encoded video, a half-saved model). When the daemon starts no job is running yet, so
every such left-over belongs to a dead process.

On a root shared by several daemons, another one may be writing right now, so a daemon that
starts beside others removes only the left-overs nothing has touched for ``STALE_LEFTOVER_S``:
a live write changes its temporary as it goes (the slowest, a video's frames or a staged
model folder, within minutes), and a writer stopped that long has lost its job's lease long
ago, so nothing it still writes could be recorded.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from dropkiln.config import Paths

log = logging.getLogger(__name__)

STALE_LEFTOVER_S = 3600.0


def is_leftover(name: str, is_dir: bool, in_outputs: bool) -> bool:
    if not name.startswith("."):
        return False
    # Outputs hold nothing hidden but temporaries; in state/, atomic_path's and unzipping.
    return in_outputs or name.endswith(".unzip" if is_dir else ".part")


def _last_touched(path: Path) -> float:
    """When anything in ``path`` last changed (a folder: its newest entry, at any depth)."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for folder, _, files in os.walk(path):
                for name in files:
                    newest = max(newest, Path(folder, name).lstat().st_mtime)
    except OSError:
        return time.time()  # vanishing as we look: somebody is at work on it
    return newest


def sweep_leftovers(paths: Paths, older_than_s: float | None = None) -> list[Path]:
    """Remove the temporaries of unfinished writes; returns what was removed.

    With ``older_than_s``, only those untouched for that long (another daemon may be
    writing the others)."""
    cutoff = None if older_than_s is None else time.time() - older_than_s

    def dead(path: Path) -> bool:
        return cutoff is None or _last_touched(path) < cutoff

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
                if not dead(Path(folder, name)):
                    continue
                shutil.rmtree(Path(folder, name), ignore_errors=True)
                removed.append(Path(folder, name))
            for name in files:
                if is_leftover(name, False, in_outputs) and dead(Path(folder, name)):
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
            hidden = entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink()
            if hidden and dead(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    for path in removed:
        log.info("removed %s, left by an unfinished write", path)
    return removed
