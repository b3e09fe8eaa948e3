"""Benchmarks: speed figures with ratios against a baseline run in the same process.

Benchmarks measure; tests assert behaviour. Each module here has a ``bench_*`` function
returning a JSON-ready dict and runs as ``python -m dropkiln.bench.<name>``; the
``dropkiln bench SUITE`` command (cli.py) runs them as suites and writes a report
(results.json, results.csv, report.md, plots) under ROOT/outputs/bench/.
"""
