"""A StageContext for running a stage alone: in tests, benchmarks and the REPL."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropkiln.stages.base import Artifact, StageResult
from dropkiln.stages.faults import FaultInjector


@dataclass
class LocalContext:
    """Records what a stage reports; ``stop_after`` makes ``should_stop`` turn true."""

    root: Path
    work_dir: Path
    job_id: str = "local"
    attempt: int = 1
    memory_rung: int = 0
    device: str = "cpu"
    upstream_results: dict[str, StageResult | dict[str, Any]] = field(default_factory=dict)
    """Results of the jobs this one depends on, by stage: as a stage returned them, or as
    JobSucceeded recorded them."""
    faults: FaultInjector = field(default_factory=FaultInjector)
    saved: dict[str, Any] | None = None
    stop_after: int | None = None
    """``should_stop`` returns True from its N-th call on."""
    progress_log: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    unusable: list[tuple[str, str, int]] = field(default_factory=list)
    _stop_calls: int = 0
    _recorded: dict[Path, str] = field(default_factory=dict)

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        self.progress_log.append((done, total, metrics))

    def checkpoint(self, state: dict[str, Any], artifacts: Sequence[Artifact] = ()) -> None:
        for artifact in artifacts:
            self.artifact(*artifact)
        self.checkpoints.append(state)
        self.saved = state

    def resume_state(self) -> dict[str, Any] | None:
        return self.saved

    def checkpoint_unusable(self, checkpoint: str, reason: str, resumed_from_step: int) -> None:
        self.unusable.append((checkpoint, reason, resumed_from_step))

    def artifact(self, path: Path, kind: str, sha256: str | None = None) -> None:
        digest = sha256 or hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if self._recorded.get(Path(path)) != digest:  # idempotent, as the daemon's
            self._recorded[Path(path)] = digest
            self.artifacts.append((Path(path), kind))

    def should_stop(self) -> bool:
        self._stop_calls += 1
        return self.stop_after is not None and self._stop_calls >= self.stop_after

    def upstream(self, stage: str) -> dict[str, Any]:
        result = self.upstream_results[stage]
        # As the daemon hands it on: the JSON that JobSucceeded recorded.
        return result.model_dump(mode="json") if isinstance(result, StageResult) else result

    def fault(self, point: str) -> None:
        self.faults.hit(point)

    def deferred_fault(self, point: str) -> str | None:
        return self.faults.deferred(point)
