"""``--profile``: one run of a suite's hot loop under torch.profiler.

Writes a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev), and
returns the top operators by self time and the share of wall time spent outside torch
operators (Python, file I/O, waiting): the part a faster kernel cannot win back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dropkiln.stages.base import atomic_path, write_atomic

TOP_OPERATORS = 15


def profile_call(fn: Callable[[], Any], folder: Path, device: str = "cpu") -> dict[str, Any]:
    """Run ``fn`` once under the profiler; trace and operator table go to ``folder``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    trace = folder / "trace.json"
    with atomic_path(trace) as partial:
        profiler.export_chrome_trace(str(partial))
    averages = profiler.key_averages()
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort_key, row_limit=TOP_OPERATORS * 2)
    write_atomic(folder / "operators.txt", table + "\n")
    inside_s = torch_op_seconds(profiler.events())
    return {
        "trace": str(trace),
        "operators_table": str(folder / "operators.txt"),
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
