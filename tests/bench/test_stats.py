"""Percentiles and latency summaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dropkiln.bench.stats import intervals, latency_summary, percentile


def test_percentiles_of_a_known_list() -> None:
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile([7.0], 99) == 7.0


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60),
    st.floats(0, 100),
)
def test_percentile_agrees_with_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-9, abs=1e-6)


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_latency_summary_and_intervals() -> None:
    summary = latency_summary([0.1, 0.2, 0.3, 0.4])
    assert summary["n"] == 4
    assert summary["p50"] == pytest.approx(0.25)
    assert summary["min"] == 0.1 and summary["max"] == 0.4
    assert summary["p95"] <= summary["p99"] <= summary["max"]
    assert latency_summary([]) == {"n": 0}
    assert intervals([1.0, 1.5, 3.0]) == [0.5, 1.5]


def test_paired_ratio_is_the_median_of_each_turns_ratio_with_its_spread() -> None:
    from dropkiln.bench.stats import paired_ratio

    # turns 2 and 4 ran while a neighbour loaded the box: both sides slowed down alike
    daemon = [1.04, 3.12, 1.03, 5.2, 1.05]
    clean = [1.00, 3.00, 1.00, 5.0, 1.00]
    paired = paired_ratio(daemon, clean)
    assert paired == {
        "ratio": 1.04, "min": 1.03, "max": 1.05, "turns": 5,
        "per_turn": [1.04, 1.04, 1.03, 1.04, 1.05],
        "ci95": [1.03, 1.05],  # five turns cannot narrow a 95% interval: the whole range
    }  # fmt: skip
    # the ratio of the two medians mixes turns: here a loaded daemon turn over a quiet
    # clean one, a figure no turn measured
    assert round(sorted(daemon)[2] / sorted(clean)[2], 3) != paired["ratio"]
    with pytest.raises(ValueError, match="turns"):
        paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="turns"):
        paired_ratio([], [])


def test_the_median_interval_takes_the_ranks_of_the_published_tables() -> None:
    """The order-statistic interval for a median, as tabulated (e.g. Conover, Practical
    Nonparametric Statistics, table A3; NIST's Engineering Statistics Handbook): at 95%,
    n = 6 gives ranks 1 and 6, n = 9 ranks 2 and 8, n = 10 ranks 2 and 9, n = 21 ranks 6
    and 16, n = 25 ranks 8 and 18; below 6 values no pair of ranks reaches 95%."""
    from dropkiln.bench.stats import median_interval

    for n, (low, high) in {6: (1, 6), 9: (2, 8), 10: (2, 9), 21: (6, 16), 25: (8, 18)}.items():
        values = [float(rank) for rank in range(n, 0, -1)]  # unsorted on purpose
        assert median_interval(values) == [low, high], n
    assert median_interval([3.0, 1.0, 2.0]) == [1.0, 3.0]
    assert median_interval([0.9] * 12) == [0.9, 0.9]
    with pytest.raises(ValueError):
        median_interval([])
