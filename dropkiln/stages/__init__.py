"""The stages: bucket, cache, train, generate, video. Each module defines ``STAGE``.

Stage modules import torch and diffusers lazily (inside functions), so looking a stage up
here is cheap.
"""

from __future__ import annotations

import importlib

from dropkiln.stages.base import (
    MemoryRung,
    StageContext,
    StageDef,
    StageError,
    StageResult,
    StageSpec,
    StageStopped,
    atomic_path,
    fsync_dir,
    write_atomic,
)

STAGE_NAMES = ("bucket", "cache", "train", "generate", "video")

__all__ = [
    "STAGE_NAMES",
    "MemoryRung",
    "StageContext",
    "StageDef",
    "StageError",
    "StageResult",
    "StageSpec",
    "StageStopped",
    "atomic_path",
    "fsync_dir",
    "get_stage",
    "write_atomic",
]


def get_stage(name: str) -> StageDef:
    """The StageDef of a stage by name (imports its module on first use)."""
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage {name!r}")
    module = importlib.import_module(f"dropkiln.stages.{name}")
    stage: StageDef = module.STAGE
    return stage
