"""The figures of the daemon benchmark's clean arms, and its printed summary.

Each turn runs the clean process at torch's default thread count and, when the daemon's
default count differs, one at the daemon's count (``clean_turn``). ``same_threads`` sets the
daemon against the latter and says how much the default count gained; ``pipeline_ms`` gives
each side's time outside diffusers' calls, which the box's speed drift leaves alone, and
inside them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dropkiln.bench.clean import CleanBatched, CleanDiffusers
from dropkiln.bench.stats import paired_ratio


def clean_turn(
    cleans: Sequence[CleanDiffusers | CleanBatched], baselines: list[list[float]],
    outs: list[Path], request: list[dict[str, Any]], batch: int = 1,
) -> None:  # fmt: skip
    """One turn of each clean process, back to back, each into its own folder."""
    for clean, seconds, out in zip(cleans, baselines, outs, strict=True):
        seconds.append(clean.render(request, out, batch))


def pipeline_ms(
    jobs: list[dict[str, Any]], cleans: Sequence[CleanDiffusers | CleanBatched], turns: int
) -> dict[str, Any]:
    """Median milliseconds per drop outside diffusers' pipeline calls and inside them, each
    side (the clean processes' last ``turns``).

    Outside: the daemon's from JobStarted to its last PNG (set-up, records, infotext, PNG
    writes), each clean process's its scheduler set-up and PNG saves; less noisy than the
    ratios, since the calls' own time, which moves with the box's speed from one second to
    the next, is left out. Inside: the wall and the calling thread's CPU; wall above CPU is
    time the thread waited (the GIL, a core), CPU above wall torch's other threads at work."""
    outside = {"daemon": [job["outside_s"] for job in jobs]}
    inside = {"daemon": [job["inside_s"] for job in jobs]}
    names = ["clean", "clean_same_threads"][: len(cleans)]
    for name, clean in zip(names, cleans, strict=True):
        outside[name] = clean.outside_s[-turns:]
        inside[name] = clean.inside_s[-turns:]
    return {
        "outside_pipeline_ms": {name: _ms(values) for name, values in outside.items()},
        "inside_pipeline_ms": {
            name: {
                "wall": _ms([wall for wall, _ in pairs]),
                "cpu": _ms([cpu for _, cpu in pairs]),
                "wall_less_cpu": _ms([wall - cpu for wall, cpu in pairs]),
            }
            for name, pairs in inside.items()
        },
    }


def _ms(seconds: Sequence[float]) -> float:
    return round(1000 * statistics.median(seconds), 1)


def same_threads(run: list[float], baselines: list[list[float]]) -> dict[str, Any] | None:
    """The daemon against the clean process at its own thread count (None: the counts are
    equal, and the main ratio is that figure): the median of the turns' ratios, the spread,
    and how many times as fast the clean process at torch's default count ran (its seconds
    at the daemon's count ÷ at the default: the thread policy's part of the main ratio)."""
    if len(baselines) < 2:
        return None
    alike, default = baselines[-1], baselines[0]
    paired = paired_ratio(run, alike)
    return {
        "clean_s": alike,
        "ratio": paired["ratio"],
        "ratio_spread": [paired["min"], paired["max"]],
        "ratio_ci95": paired["ci95"],
        "images_per_s_ratio": round(1 / paired["ratio"], 3),
        "default_threads_speedup": paired_ratio(alike, default)["ratio"],
    }


def _print_apart(part: dict[str, Any], threads: int) -> None:
    """The same turns against the clean process at the daemon's thread count, and each side's
    time outside diffusers' calls."""
    alike = part["same_threads"]
    if alike:
        low, high = alike["ratio_spread"]
        print(f"  against a clean process at the daemon's {threads} torch threads: time ratio "
              f"{alike['ratio']:.3f} (per turn {low:.3f}-{high:.3f}, the median's 95% interval "
              f"{_interval(alike)}; images/s {alike['images_per_s_ratio']:.3f}); at torch's "
              f"default count that process ran {alike['default_threads_speedup']:.3f}x as "
              f"fast")  # fmt: skip
    print(f"  outside diffusers' calls, ms per drop (median): {part['outside_pipeline_ms']}")
    if "inside_pipeline_ms" in part:
        print(f"  inside them, ms per drop (median): {part['inside_pipeline_ms']}")


def _interval(figures: dict[str, Any], key: str = "ratio_ci95") -> str:
    low, high = figures[key]
    return f"{low:.3f}-{high:.3f}"


def print_figures(figures: dict[str, Any]) -> None:
    """The figures of ``bench_daemon`` as lines, then the whole as JSON."""
    warm, row = figures["warm"], figures["row"]
    size = f"{figures['size']}x{figures['size']}"
    print(f"{figures['model']}, {size}, {figures['steps']} steps, settle_seconds "
          f"{figures['settle_seconds']}, torch threads {figures['torch_threads']}, load average "
          f"before {figures['load_average_before']}, after "
          f"{figures['load_average_after']}")  # fmt: skip
    print(f"run (JobStarted → last PNG): daemon {warm['run_median_s']:.3f}s, clean "
          f"diffusers process {warm['clean_median_s']:.3f}s: ratio {warm['ratio']:.3f}, median "
          f"of {warm['repeat']} turns' ratios, {warm['ratio_spread'][0]:.3f}-"
          f"{warm['ratio_spread'][1]:.3f}, the median's 95% interval {_interval(warm)} (goal "
          f"<= 1.05)")  # fmt: skip
    threads = figures["torch_threads"]["daemon"]
    _print_apart(warm, threads)
    print(f"pickup (drop → JobStarted): p95 {warm['pickup_p95_s']:.3f}s "
          f"(goal <= settle + 0.05 s)")  # fmt: skip
    batched = warm["batched"]
    if batched:
        print(f"batch {batched['batch']}: daemon {batched['images_per_s']} images/s (to the last "
              f"PNG), clean batched process {batched['clean_images_per_s']} images/s: images/s "
              f"ratio {batched['images_per_s_ratio']:.3f} (per turn "
              f"{batched['images_per_s_ratio_spread'][0]:.3f}-"
              f"{batched['images_per_s_ratio_spread'][1]:.3f}, the median's 95% interval "
              f"{_interval(batched, 'images_per_s_ratio_ci95')}; goal >= 0.97), to JobSucceeded "
              f"{batched['ratio_done']:.3f}; batch {batched['batch']} vs 1 in the daemon: "
              f"{warm['speedup_batched_vs_single']}x")  # fmt: skip
        _print_apart(batched, threads)
    print(f"{row['files']} files: daemon {row['daemon_s']:.2f}s, "
          f"one process each {row.get('processes_s')}s")  # fmt: skip
    for name, parts in figures["profile"].items():
        print(f"profile, {name} drops: {json.dumps(parts)}")
    print(json.dumps(figures))
