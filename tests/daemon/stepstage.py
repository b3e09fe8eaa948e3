"""A small, real stage used to drive the daemon's machinery in tests: it counts steps,
checkpoints each one to a file, resumes from it, honours should_stop and fault points."""

from __future__ import annotations

import json
import time
from typing import Any

from dropkiln.stages import MemoryRung, StageDef, StageSpec, StageStopped, write_atomic


class StepSpec(StageSpec):
    steps: int = 5
    sleep: float = 0.0
    fail_with: str | None = None
    needs: str | None = None
    hang_at: int | None = None
    """On its first attempt, block at this step for ``hang`` seconds without a word to its
    context, as a GPU call stuck in the driver would."""
    hang: float = 0.0


def run_steps(spec: StepSpec, ctx: Any) -> dict[str, Any]:
    state = ctx.resume_state() or {"step": 0, "ran": []}
    ran: list[int] = list(state["ran"])
    for step in range(state["step"] + 1, spec.steps + 1):
        if ctx.should_stop():
            raise StageStopped()
        ctx.fault("steps.step")
        if step == spec.hang_at and ctx.attempt == 1:
            time.sleep(spec.hang)
        if spec.fail_with:
            raise ValueError(spec.fail_with)
        time.sleep(spec.sleep)
        ran.append(step)
        write_atomic(ctx.work_dir / "state.json", json.dumps(ran))
        ctx.checkpoint({"step": step, "ran": ran, "rung": ctx.memory_rung})
        ctx.progress(step, spec.steps)
    out = ctx.work_dir / "out.json"
    write_atomic(out, json.dumps({"ran": ran}))
    ctx.artifact(out, "result")
    upstream = ctx.upstream(spec.needs) if spec.needs else None
    return {"ran": ran, "rung": ctx.memory_rung, "upstream": upstream}


def stage(name: str, lane: str = "gpu", priority: int = 0) -> StageDef:
    return StageDef(
        name,
        lane,  # type: ignore[arg-type]
        StepSpec,
        run_steps,
        ladder=(MemoryRung("default"), MemoryRung("lighter"), MemoryRung("lightest")),
        priority=priority,
        inputs=("result",),
    )


STAGES = {
    "steps": stage("steps"),
    "urgent": stage("urgent", priority=10),
    "cpusteps": stage("cpusteps", lane="cpu", priority=5),
}
