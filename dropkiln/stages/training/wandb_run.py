"""Weights & Biases beside TensorBoard, for those who compare runs there.

Used only when both hold: the ``wandb`` package is installed (``pip install
'dropkiln[wandb]'``) and ``[train] wandb_project`` names a project. The run is offline
unless ``WANDB_MODE`` says otherwise: it is written under OUTPUT/wandb/ and ``wandb sync``
uploads it later, so nothing goes on the network while a job runs. A run that cannot start
is logged and training goes on without it: tracking never costs a LoRA.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODE = "offline"


class WandbRun:
    """The same scalars and validation images as the TensorBoard files, in one wandb run."""

    def __init__(self, run: Any, module: Any) -> None:
        self._run = run
        self._wandb = module

    @property
    def offline(self) -> bool:
        return bool(self._run.offline)

    @property
    def folder(self) -> Path:
        """The run's own folder (offline-run-… under OUTPUT/wandb/)."""
        return Path(self._run.dir).parent

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def images(self, step: int, paths: Sequence[Path]) -> None:
        if paths:
            pictures = {f"validation/{p.stem[-2:]}": self._wandb.Image(str(p)) for p in paths}
            self._run.log(pictures, step=step)

    def finish(self, summary: Mapping[str, float]) -> None:
        self._run.summary.update(dict(summary))
        self.close()

    def close(self) -> None:
        self._run.finish()


def open_wandb(
    project: str, output_dir: Path, name: str, run_id: str, config: Mapping[str, Any]
) -> WandbRun | None:
    """The run, or None when wandb is not installed, not configured or cannot start."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        log.warning(
            "wandb_project = %r but wandb is not installed (pip install 'dropkiln[wandb]'); "
            "tracking to TensorBoard only",
            project,
        )
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    mode: Any = os.environ.get("WANDB_MODE", DEFAULT_MODE)
    try:
        run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            dir=str(output_dir),  # wandb writes into its wandb/ folder
            mode=mode,
            config=dict(config),
            reinit="create_new",
            # no console capture (the daemon's log is its own) and no system-metrics sampler
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
    except Exception:
        log.warning("wandb run %s did not start; tracking to TensorBoard only", name,
                    exc_info=True)  # fmt: skip
        return None
    return WandbRun(run, wandb)
