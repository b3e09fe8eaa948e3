"""``dropkiln bench SUITE`` and ``dropkiln bench compare A.json B.json``.

Torch is imported only by the suites that run a model (cache, train, generate, daemon) and
by ``--threads``; store, bucket and video never import it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from dropkiln.bench.machine import machine_info
from dropkiln.bench.memory import MemoryWatch
from dropkiln.bench.profile import Profiler, profiler_for
from dropkiln.bench.record import SuiteRecord
from dropkiln.bench.report import (
    compare_text,
    load_results,
    results_document,
    summary_table,
    write_results,
)
from dropkiln.bench.suites import BenchOptions
from dropkiln.config import Settings
from dropkiln.stages.base import write_atomic

Suite = Callable[[BenchOptions, Profiler | None], SuiteRecord]
SUITE_NAMES = (
    *("store", "bucket", "cache", "train", "generate", "video", "daemon", "preempt", "api"),
    "scaleout",
    "idle",
    "cli",
)
MODEL_SUITES = frozenset({"cache", "train", "generate", "daemon", "preempt"})


def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Run the suites asked for and write the report; or compare two results files."""
    if args.suite == "compare":
        return _compare(args.files)
    if args.files:
        raise ValueError(f"unexpected arguments after the suite name: {' '.join(args.files)}")
    if args.suite not in (*SUITE_NAMES, "all"):
        expected = ", ".join([*SUITE_NAMES, "all", "compare"])
        raise ValueError(f"unknown suite {args.suite!r}: expected one of {expected}")
    names = list(SUITE_NAMES) if args.suite == "all" else [args.suite]
    options = BenchOptions(
        model=args.model or settings.model,
        device="cpu",
        models_dir=settings.paths.models,
        quick=args.quick,
        resolution=_positive(args.resolution, "--resolution"),
        steps=_positive(args.steps, "--steps"),
        batch_sizes=parse_sizes(args.batch_sizes),
        repeats=_positive(args.repeats, "--repeats"),
        warmup=_at_least_zero(args.warmup, "--warmup"),
        events=_positive(args.events, "--events"),
    )
    threads = _positive(args.threads, "--threads")
    device, dtype = _device(
        args.device or settings.device, bool(MODEL_SUITES & set(names)), threads
    )
    options = replace(options, device=device, threads=threads)
    out = Path(args.out) if args.out else settings.paths.bench / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device, dtype)
    started = time.perf_counter()
    records, failed = [], []
    for name in names:
        print(f"▶ {name} …", file=sys.stderr, flush=True)
        record = _run_suite(name, options, out if args.profile else None)
        if any(note.startswith("failed:") for note in record.notes):
            failed.append(name)
        records.append(record)
    machine["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    document = results_document(
        records, machine, _options_json(args, options), time.perf_counter() - started
    )
    written = write_results(document, out)
    if args.json_file:
        write_atomic(Path(args.json_file), json.dumps(document, indent=1) + "\n")
    print(summary_table(document))
    print(f"\nreport: {out / 'report.md'}  ({len(written)} files in {out})")
    if failed:
        print(f"dropkiln: error: suite(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def parse_sizes(text: str | None) -> tuple[int, ...] | None:
    """``"1,2,4"`` → (1, 2, 4); every size a positive integer."""
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: expected integers like 1,2,4") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {text!r}: expected positive integers like 1,2,4")
    return sizes


def _run_suite(name: str, options: BenchOptions, profile_root: Path | None) -> SuiteRecord:
    profiler = (
        profiler_for(profile_root / f"profile-{name}", options.device) if profile_root else None
    )
    started = time.perf_counter()
    with MemoryWatch(options.device) as watch:
        try:
            record = _suites()[name](options, profiler)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            record = SuiteRecord(name, notes=[f"failed: {type(exc).__name__}: {exc}"])
    record.seconds = round(time.perf_counter() - started, 2)
    record.memory = watch.report()
    return record


def _suites() -> dict[str, Suite]:
    from dropkiln.bench.model_suites import daemon_suite, generate_suite, train_suite
    from dropkiln.bench.preempt import preempt_suite
    from dropkiln.bench.scaleout import scaleout_suite
    from dropkiln.bench.suites import (
        api_suite,
        bucket_suite,
        cache_suite,
        cli_suite,
        idle_suite,
        store_suite,
        video_suite,
    )

    return {
        "store": store_suite,
        "bucket": bucket_suite,
        "cache": cache_suite,
        "train": train_suite,
        "generate": generate_suite,
        "video": video_suite,
        "daemon": daemon_suite,
        "preempt": preempt_suite,
        "api": api_suite,
        "scaleout": scaleout_suite,
        "idle": idle_suite,
        "cli": cli_suite,
    }


def _device(requested: str, uses_torch: bool, threads: int | None) -> tuple[str, str | None]:
    """The device the suites run on and the dtype(s) they compute in; torch's threads."""
    if not uses_torch:
        return ("cpu" if requested == "auto" else requested), None
    import torch

    from dropkiln.stages.device import resolve_device
    from dropkiln.stages.generation.render import inference_dtype
    from dropkiln.stages.models.encoding import compute_dtype

    device = resolve_device(requested)
    if threads is not None:
        torch.set_num_threads(threads)
    elif device == "cpu":
        # With every core busy (other work, or bucketing's processes), torch's per-core
        # thread pool fights for them and runs up to ten times slower, and unevenly.
        torch.set_num_threads(1)
    generate, train = inference_dtype(device), compute_dtype(device)
    if generate == train:
        return device, str(generate).removeprefix("torch.")
    names = (str(generate).removeprefix("torch."), str(train).removeprefix("torch."))
    return device, f"generate {names[0]}, cache/train {names[1]}"


def _compare(files: list[str]) -> int:
    if len(files) != 2:
        raise ValueError("compare takes two results files: dropkiln bench compare A.json B.json")
    first, second = (load_results(Path(name)) for name in files)
    print(compare_text(first, second, files[0], files[1]))
    return 0


def _options_json(args: argparse.Namespace, options: BenchOptions) -> dict[str, Any]:
    return {
        "suite": args.suite,
        "model": options.model,
        "device": options.device,
        "quick": options.quick,
        "resolution": options.resolution,
        "steps": options.steps,
        "batch_sizes": list(options.batch_sizes) if options.batch_sizes else None,
        "repeats": options.repeats,
        "warmup": options.warmup,
        "events": options.events,
        "profile": bool(args.profile),
        "threads": args.threads,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _positive(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be at least 1 (got {value})")
    return value


def _at_least_zero(value: int | None, flag: str) -> int | None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be 0 or more (got {value})")
    return value
