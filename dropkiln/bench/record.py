"""One suite's results in the shape every report, plot and comparison reads."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dropkiln.bench.stats import latency_summary

Better = Literal["higher", "lower"] | None


@dataclass
class Metric:
    value: float | None
    unit: str
    better: Better = None
    goal: str | None = None
    headline: bool = False
    """Shown in the terminal summary; every metric is in the JSON, CSV and Markdown."""

    def verdict(self) -> str:
        """``met`` or ``not met`` for a goal written as ``<op> <number>`` (anything after the
        number, like "on 2 cores", is a comment); empty without a goal or a value."""
        if self.goal is None or self.value is None:
            return ""
        match = GOAL.match(self.goal)
        if match is None:
            return ""
        op, threshold = match["op"], float(match["number"])
        return "met" if COMPARE[op](float(self.value), threshold) else "not met"


GOAL = re.compile(r"\s*(?P<op><=|>=|<|>)\s*(?P<number>-?\d+(?:\.\d+)?)\b")
COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}


@dataclass
class SuiteRecord:
    """Figures of one suite: metrics, latency distributions, phases, sweep, series."""

    suite: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metric(
        self,
        name: str,
        value: float | None,
        unit: str,
        better: Better = None,
        goal: str | None = None,
        headline: bool = False,
    ) -> None:
        if value is not None and not math.isfinite(value):
            value = None
        self.metrics[name] = Metric(value, unit, better, goal, headline)

    def flag(self, name: str, goal: str | None = None, headline: bool = True) -> None:
        """Give an existing metric a goal and show it in the terminal summary."""
        self.metrics[name].goal = goal
        self.metrics[name].headline = headline

    def latencies(self, name: str, seconds: Sequence[float], what: str) -> None:
        """A latency distribution (seconds) with its p50/p95/p99 in ms as metrics."""
        summary = latency_summary(seconds)
        summary["what"] = what
        self.latency[name] = summary
        self.samples[name] = [float(value) for value in seconds]
        if summary["n"]:
            for q in ("p50", "p95", "p99"):
                self.metric(f"{name}_{q}_ms", round(summary[q] * 1000, 4), "ms", "lower")

    def compared(self, name: str, ratio: float, means: str, goal: str | None = None) -> None:
        """The side-by-side baseline of this suite and the ratio against it."""
        self.baseline = {"name": name, "ratio": round(ratio, 4), "means": means, "goal": goal}
        self.metric("baseline_ratio", round(ratio, 4), "x", None, goal, headline=True)

    def swept(self, x: str, y: str, rows: list[dict[str, Any]]) -> None:
        """A sweep: ``rows`` each hold ``x`` and ``y`` (and more), e.g. batch size → steps/s."""
        self.sweep = {"x": x, "y": y, "rows": rows}

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def record_from_json(data: dict[str, Any]) -> SuiteRecord:
    """A record read back from results.json."""
    fields = dict(data)
    fields["metrics"] = {name: Metric(**m) for name, m in data.get("metrics", {}).items()}
    return SuiteRecord(**fields)
