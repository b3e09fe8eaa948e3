"""What a benchmark run leaves behind: results.json, results.csv, report.md and plots, a
terminal summary, and the comparison of two results files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from dropkiln.bench.plots import write_plots
from dropkiln.bench.record import Metric, SuiteRecord, record_from_json
from dropkiln.stages.base import write_atomic

FORMAT = "dropkiln-bench/1"
SAME_WITHIN = 0.05
"""Ratios within ±5% are reported as the same: run-to-run noise on a busy machine."""

MACHINE_KEYS = ("cpu", "cores_logical", "ram_gb", "gpu", "device", "dtype", "torch_threads")


def results_document(
    records: list[SuiteRecord], machine: dict[str, Any], options: dict[str, Any], seconds: float
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "machine": machine,
        "options": options,
        "seconds": round(seconds, 2),
        "suites": {record.suite: record.as_json() for record in records},
    }


def write_results(document: dict[str, Any], folder: Path) -> list[Path]:
    """results.json, results.csv, the plots and report.md in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    records = _records(document)
    plots = write_plots(records, folder)
    return [
        write_atomic(folder / "results.json", json.dumps(document, indent=1) + "\n"),
        write_atomic(folder / "results.csv", csv_text(document)),
        write_atomic(folder / "report.md", markdown(document, plots)),
        *plots,
    ]


def load_results(path: Path) -> dict[str, Any]:
    """A results.json, checked to be one (a clear error otherwise)."""
    try:
        document: dict[str, Any] = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dropkiln bench results file ({FORMAT})")
    return document


def csv_text(document: dict[str, Any]) -> str:
    """One row per metric: suite, metric, value, unit, better, goal."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["suite", "metric", "value", "unit", "better", "goal"])
    for record in _records(document):
        for name, metric in record.metrics.items():
            writer.writerow(
                [
                    record.suite,
                    name,
                    metric.value,
                    metric.unit,
                    metric.better or "",
                    metric.goal or "",
                ]
            )
    return out.getvalue()


def summary_table(document: dict[str, Any]) -> str:
    """The headline figures of every suite, for the terminal."""
    rows = [("suite", "figure", "value", "goal")]
    for record in _records(document):
        for name, metric in record.metrics.items():
            if metric.headline:
                rows.append((record.suite, name, _with_unit(metric), _goal(metric)))
        peak = record.memory.get("rss_peak_bytes")
        if peak:
            rows.append((record.suite, "peak RSS", f"{peak / 2**20:,.0f} MB", ""))
        rows.append((record.suite, "suite time", f"{record.seconds:.1f} s", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown(document: dict[str, Any], plots: list[Path]) -> str:
    """The Markdown report: machine, summary, then every suite in detail."""
    machine = document["machine"]
    lines = [f"# dropkiln bench, {machine.get('date')}", ""]
    lines += ["| machine | |", "|---|---|"]
    for key in (
        "cpu",
        "cores_physical",
        "cores_logical",
        "ram_gb",
        "gpu",
        "device",
        "dtype",
        "torch_threads",
        "python",
        "os",
        "dropkiln",
        "git_commit",
        "load_average",
        "load_average_after",
    ):
        lines.append(f"| {key} | {machine.get(key)} |")
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v)
    lines += [f"| versions | {versions} |", ""]
    lines += [f"Options: `{json.dumps(document['options'])}`", ""]
    lines += ["## Summary", "", "```", summary_table(document), "```", ""]
    lines += ["## Goals", "", *goals_table(document), ""]
    for record in _records(document):
        lines += _suite_markdown(record, [p for p in plots if p.name.startswith(record.suite)])
    return "\n".join(lines) + "\n"


def _suite_markdown(record: SuiteRecord, plots: list[Path]) -> list[str]:
    lines = [f"## {record.suite}", "", f"Configuration: `{json.dumps(record.config)}`", ""]
    if record.baseline:
        b = record.baseline
        goal = f" (goal {b['goal']})" if b.get("goal") else ""
        lines += [
            f"Baseline, measured in the same run: {b['name']}. "
            f"Ratio **{b['ratio']}**{goal}: {b['means']}.",
            "",
        ]
    lines += ["| metric | value | unit | goal |", "|---|---:|---|---|"]
    for name, metric in record.metrics.items():
        lines.append(f"| {name} | {_number(metric.value)} | {metric.unit} | {_goal(metric)} |")
    lines.append("")
    if record.latency:
        lines += [
            "| latency | what | n | p50 ms | p95 ms | p99 ms | mean ms | max ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in record.latency.items():
            if s.get("n"):
                cells = " | ".join(
                    _number(s[k] * 1000) for k in ("p50", "p95", "p99", "mean", "max")
                )
                lines.append(f"| {name} | {s.get('what', '')} | {s['n']} | {cells} |")
        lines.append("")
    for side, phases in record.phases.items():
        if phases.get("iterations"):
            lines += [
                f"Time per phase, {side} (mean of {phases['iterations']}):",
                "",
                "| phase | ms | share |",
                "|---|---:|---:|",
            ]
            for phase, seconds in phases["mean_s"].items():
                share = phases["share"][phase]
                lines.append(f"| {phase} | {_number(seconds * 1000)} | {share:.1%} |")
            lines.append("")
    if record.sweep.get("rows"):
        keys = list(record.sweep["rows"][0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
        for row in record.sweep["rows"]:
            lines.append("| " + " | ".join(_number(row[k]) for k in keys) + " |")
        lines.append("")
    if record.memory:
        m = record.memory
        memory = f"Memory: peak RSS {m['rss_peak_bytes'] / 2**20:,.0f} MB (start "
        memory += f"{m['rss_start_bytes'] / 2**20:,.0f} MB)"
        if "cuda_peak_allocated_bytes" in m:
            memory += (
                f", CUDA peak allocated {m['cuda_peak_allocated_bytes'] / 2**20:,.0f} MB,"
                f" reserved {m['cuda_peak_reserved_bytes'] / 2**20:,.0f} MB"
            )
        lines += [memory + ".", ""]
    if record.profile:
        p = record.profile
        lines += [
            f"Profile ({p.get('window', 'whole run')}): {p['wall_s']} s wall, "
            f"{p['torch_ops_s']} s inside torch operators; "
            f"Python overhead share **{p['python_overhead_share']:.1%}**. "
            f"Chrome trace: `{p['trace']}`.",
            "",
            "| operator | calls | self CPU ms | CPU total ms |",
            "|---|---:|---:|---:|",
        ]
        for op in p["top_operators"][:10]:
            lines.append(
                f"| `{op['name']}` | {op['calls']} | {_number(op['self_cpu_s'] * 1000)}"
                f" | {_number(op['cpu_total_s'] * 1000)} |"
            )
        lines.append("")
    if record.notes:
        lines += [*(f"- {note}" for note in record.notes), ""]
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    return [*lines, ""]


def compare_text(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> str:
    """Per metric in both files: A, B, B÷A, and whether B is better, worse or the same."""
    lines = [f"A: {a_name}", f"B: {b_name}"]
    for key in MACHINE_KEYS:
        left, right = a["machine"].get(key), b["machine"].get(key)
        if left != right:
            lines.append(f"  machine differs: {key}: A {left}, B {right}")
    a_suites, b_suites = a["suites"], b["suites"]
    rows = [("metric", "A", "B", "B/A", "")]
    for suite in [s for s in a_suites if s in b_suites]:
        left = record_from_json(a_suites[suite]).metrics
        right = record_from_json(b_suites[suite]).metrics
        for name in [n for n in left if n in right]:
            x, y = left[name], right[name]
            ratio = y.value / x.value if x.value and y.value is not None else None
            rows.append(
                (
                    f"{suite}.{name}",
                    _with_unit(x),
                    _with_unit(y),
                    "n/a" if ratio is None else f"{ratio:.3f}",
                    _verdict(ratio, y),
                )
            )
    only = sorted(set(a_suites) ^ set(b_suites))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True)
        ]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    if only:
        lines.append(f"suites in only one file: {', '.join(only)}")
    return "\n".join(lines)


def _verdict(ratio: float | None, metric: Metric) -> str:
    if ratio is None or metric.better is None or abs(ratio - 1) <= SAME_WITHIN:
        return "same" if ratio is not None and metric.better is not None else ""
    improved = ratio > 1 if metric.better == "higher" else ratio < 1
    return "better" if improved else "worse"


def _goal(metric: Metric) -> str:
    """The goal with its verdict: ``<= 1.05: met``."""
    if not metric.goal:
        return ""
    verdict = metric.verdict()
    return f"{metric.goal}: {verdict}" if verdict else metric.goal


def goals_table(document: dict[str, Any]) -> list[str]:
    """Every figure that has a goal, met or not, as Markdown rows."""
    lines = ["| suite | figure | value | goal | verdict |", "|---|---|---:|---|---|"]
    for record in _records(document):
        for name, metric in record.metrics.items():
            if metric.goal:
                lines.append(
                    f"| {record.suite} | {name} | {_with_unit(metric)} | {metric.goal} "
                    f"| {metric.verdict() or 'see notes'} |"
                )
    return lines


def _records(document: dict[str, Any]) -> list[SuiteRecord]:
    return [record_from_json(data) for data in document["suites"].values()]


def _with_unit(metric: Metric) -> str:
    return f"{_number(metric.value)} {metric.unit}".rstrip()


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if value != 0 and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"
