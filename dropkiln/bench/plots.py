"""PNG plots of a run: throughput by batch size, latency distributions, the training loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dropkiln.bench.record import SuiteRecord
from dropkiln.stages.base import atomic_path

HISTOGRAM_FROM = 20


def write_plots(records: list[SuiteRecord], folder: Path) -> list[Path]:
    """Every plot the records have data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for record in records:
        if record.sweep.get("rows"):
            written.append(_throughput(record, folder / f"{record.suite}-throughput.png"))
        if any(len(values) > 1 for values in record.samples.values()):
            written.append(_latency(record, folder / f"{record.suite}-latency.png"))
        if record.series:
            written.append(_loss(record, folder / f"{record.suite}-loss.png"))
    return written


def _throughput(record: SuiteRecord, target: Path) -> Path:
    import matplotlib.pyplot as plt

    x, y = record.sweep["x"], record.sweep["y"]
    rows = record.sweep["rows"]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([row[x] for row in rows], [row[y] for row in rows], marker="o", label="dropkiln")
    if rows and "minimal_loop_steps_per_s" in rows[0]:
        loop = [row["minimal_loop_steps_per_s"] * row[x] for row in rows]
        axes.plot([row[x] for row in rows], loop, marker="s", linestyle="--", label="minimal loop")
        axes.legend()
    axes.set_xscale("log", base=2)
    axes.set_xticks([row[x] for row in rows], [str(row[x]) for row in rows])
    axes.set_xlabel(x.replace("_", " "))
    axes.set_ylabel(y.replace("_per_s", "/s").replace("_", " "))
    axes.set_ylim(bottom=0)
    axes.set_title(f"{record.suite}: throughput by {x.replace('_', ' ')}")
    axes.grid(alpha=0.3)
    return _save(figure, target)


def _latency(record: SuiteRecord, target: Path) -> Path:
    import matplotlib.pyplot as plt

    series = [(name, values) for name, values in record.samples.items() if len(values) > 1]
    figure, rows = plt.subplots(len(series), 1, figsize=(8, 1.6 + 1.4 * len(series)), squeeze=False)
    for (name, values), (axes,) in zip(series, rows, strict=True):
        milliseconds = [value * 1000 for value in values]
        summary: dict[str, Any] = record.latency.get(name, {})
        title = f"{name}: {summary.get('what', '')} (n={len(values)})"
        if len(values) >= HISTOGRAM_FROM:
            # a few slow outliers would squeeze the whole distribution into one bin
            edge = summary["p99"] * 1000 * 1.5
            shown = [value for value in milliseconds if value <= edge]
            if len(shown) < len(milliseconds):
                title += f", {len(milliseconds) - len(shown)} beyond {edge:.3g} ms not shown"
            axes.hist(shown, bins=min(40, len(values) // 3), color="#4c72b0")
        else:
            # a handful of runs: every run as a dot says more than a histogram
            axes.plot(milliseconds, [0] * len(values), "o", color="#4c72b0", alpha=0.7)
            axes.set_yticks([])
        # tail percentiles of a few runs are just the slowest run: marked only from 20 on
        marks = (("p50", "-"), ("p95", "--"), ("p99", ":"))[: 3 if len(values) >= 20 else 1]
        for q, style in marks:
            if q in summary:
                axes.axvline(summary[q] * 1000, color="black", linestyle=style, label=q)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("ms")
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(f"{record.suite}: latency distribution")
    return _save(figure, target)


def _loss(record: SuiteRecord, target: Path) -> Path:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, points in record.series.items():
        axes.plot([p[0] for p in points], [p[1] for p in points], label=name.replace("_", " "))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{record.suite}: loss")
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, target)


def _save(figure: Any, target: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(target) as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
    return target
