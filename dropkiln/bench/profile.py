"""``--profile``: one run of a suite's hot loop under torch.profiler.

Writes a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev), and
returns the top operators by self time and the share of wall time spent outside torch
operators (Python, file I/O, waiting): the part a faster kernel cannot win back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dropkiln.stages.base import atomic_path, write_atomic

TOP_OPERATORS = 15


class Profiler(Protocol):
    def __call__(
        self, fn: Callable[[], Any], steps: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """Profile ``fn``, or with ``steps=(a, b)`` only optimizer steps a+1…b of it."""
        ...


def profiler_for(folder: Path, device: str) -> Profiler:
    """A Profiler that writes its trace and operator table into ``folder``."""

    def run(fn: Callable[[], Any], steps: tuple[int, int] | None = None) -> dict[str, Any]:
        return profile_call(fn, folder, device, steps)

    return run


def profile_call(
    fn: Callable[[], Any], folder: Path, device: str = "cpu", steps: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Run ``fn`` once under the profiler; trace and operator table go to ``folder``.

    With ``steps=(a, b)`` the profiler records from the end of the a-th optimizer step to
    the end of the b-th: a training loop's steps without its set-up and export.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    window = _Window(profile(activities=activities), cuda)
    if steps is None:
        window.start()
        fn()
    else:
        with window.between_steps(*steps):
            fn()
    window.stop()
    return _report(window, folder, cuda, steps)


class _Window:
    def __init__(self, profiler: Any, cuda: bool) -> None:
        self.profiler, self.cuda = profiler, cuda
        self.started = self.wall_s = 0.0
        self.running = self.done = False

    def start(self) -> None:
        self.profiler.start()
        self.running, self.started = True, time.perf_counter()

    def stop(self) -> None:
        if self.running:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.wall_s = time.perf_counter() - self.started
            self.profiler.stop()
            self.running, self.done = False, True

    def between_steps(self, first: int, last: int) -> Any:
        from contextlib import contextmanager

        from torch.optim.optimizer import register_optimizer_step_post_hook

        count = 0

        def after_step(*_: Any) -> None:
            nonlocal count
            count += 1
            if count == first:
                self.start()
            elif count == last:
                self.stop()

        @contextmanager
        def hooked() -> Any:
            if first == 0:
                self.start()
            handle = register_optimizer_step_post_hook(after_step)
            try:
                yield
            finally:
                handle.remove()

        return hooked()


def _report(
    window: _Window, folder: Path, cuda: bool, steps: tuple[int, int] | None
) -> dict[str, Any]:
    if not window.done:
        raise RuntimeError(f"the profiled run ended before optimizer step {steps}")
    profiler = window.profiler
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / "trace.json"
    with atomic_path(trace) as partial:
        profiler.export_chrome_trace(str(partial))
    averages = profiler.key_averages()
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort_key, row_limit=TOP_OPERATORS * 2)
    write_atomic(folder / "operators.txt", table + "\n")
    inside_s = torch_op_seconds(profiler.events())
    wall_s = window.wall_s
    return {
        "trace": str(trace),
        "operators_table": str(folder / "operators.txt"),
        "window": f"optimizer steps {steps[0] + 1}-{steps[1]}" if steps else "whole run",
        "wall_s": round(wall_s, 4),
        "torch_ops_s": round(inside_s, 4),
        "python_overhead_share": round(max(0.0, 1 - inside_s / wall_s), 4) if wall_s else 0.0,
        "top_operators": top_operators(averages, cuda),
    }


def top_operators(averages: Any, cuda: bool = False) -> list[dict[str, Any]]:
    """The operators with the most self time (device time on a GPU, else CPU time)."""
    rows = [a for a in averages if not a.is_user_annotation]
    if cuda:
        rows.sort(key=lambda a: a.self_device_time_total, reverse=True)
    else:
        rows.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    return [
        {
            "name": a.key,
            "calls": int(a.count),
            "self_cpu_s": round(a.self_cpu_time_total / 1e6, 6),
            "cpu_total_s": round(a.cpu_time_total / 1e6, 6),
            "self_cuda_s": round(a.self_device_time_total / 1e6, 6) if cuda else None,
        }
        for a in rows[:TOP_OPERATORS]
    ]


def torch_op_seconds(events: Any) -> float:
    """Wall time during which any thread was inside an outermost torch operator."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.cpu_parent is None and not e.is_user_annotation and e.device_type.name == "CPU"
    )
    covered, reach = 0.0, float("-inf")
    for start, end in spans:
        if end <= reach:
            continue
        covered += end - max(start, reach)
        reach = end
    return covered / 1e6
