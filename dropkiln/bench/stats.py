"""Latency summaries: percentiles with linear interpolation, as numpy's default method."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from itertools import pairwise
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 ≤ q ≤ 100) of ``values``, interpolating between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    below, above = math.floor(rank), math.ceil(rank)
    if below == above:
        return float(ordered[below])
    weight = rank - below
    return float(ordered[below] * (1 - weight) + ordered[above] * weight)


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    """n, mean, min, max, stdev and p50/p95/p99 of per-iteration times in seconds."""
    values = [float(value) for value in seconds]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": _round(statistics.fmean(values)),
        "min": _round(min(values)),
        "p50": _round(percentile(values, 50)),
        "p95": _round(percentile(values, 95)),
        "p99": _round(percentile(values, 99)),
        "max": _round(max(values)),
        "stdev": _round(statistics.stdev(values)) if len(values) > 1 else 0.0,
    }


def intervals(stamps: Sequence[float]) -> list[float]:
    """Durations between consecutive time stamps."""
    return [later - earlier for earlier, later in pairwise(stamps)]


def _round(value: float) -> float:
    # Six significant digits: microseconds on fast appends, milliseconds on long runs.
    return float(f"{value:.6g}")


def paired_ratio(measured: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """The median of each turn's ``measured / baseline``, the lowest and highest, and each.

    Each turn ran its two sides back to back, so a load that comes and goes on a shared box
    slows both sides of a turn alike; the ratio of the two sides' medians would pair one
    turn's daemon with another's clean process."""
    if not measured or len(measured) != len(baseline):
        raise ValueError(f"{len(measured)} and {len(baseline)} turns: a ratio needs pairs")
    per_turn = [round(m / b, 3) for m, b in zip(measured, baseline, strict=True)]
    return {
        "ratio": round(statistics.median(per_turn), 3),
        "min": min(per_turn),
        "max": max(per_turn),
        "turns": len(per_turn),
        "per_turn": per_turn,
        "ci95": median_interval(per_turn),
    }


def median_interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """A distribution-free confidence interval for the median: the k-th lowest and k-th
    highest value, k the largest rank with P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so
    the interval covers the median with at least ``level``'s probability whatever the
    spread's shape. Too few values for that level (fewer than 6 at 95%): the whole range."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("an interval of no values")
    tail = (1 - level) / 2
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2:
        nxt = below + math.comb(n, k) / 2**n
        if nxt > tail:
            break
        k, below = k + 1, nxt
    if k == 0:
        return [ordered[0], ordered[-1]]
    return [ordered[k - 1], ordered[n - k]]
