"""What a torch thread count costs a plain diffusers script, idle and under load.

The data behind the ``torch_threads`` default: one clean diffusers process per thread count
(``bench/clean.py``, warm model, no dropkiln module), taking turns on the same images, with
``--busy N`` busy-loop processes at normal priority as a load the run controls (whatever
else runs on the box comes on top: the load average is printed before and after). On a
2-core box idle, 2 threads are a little faster than 1; once another program wants a core,
every parallel op of the 2-thread process waits at its barrier for the thread that lost it.

With ``--inference-mode`` each count's process also renders each turn's images with its
calls under ``torch.inference_mode``, as the daemon makes them: the turns' paired ratio is
what that mode saves a plain script (one process for both: no two heaps to tell apart).

Run ``python -m dropkiln.bench.threads [--threads 1,2] [--busy 0] [--turns 6] [--size 96]
[--batch 1] [--inference-mode]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dropkiln.bench.cache import link_models
from dropkiln.bench.clean import CleanDiffusers
from dropkiln.bench.stats import paired_ratio

STEPS = 12
IMAGES = 4


def bench_threads(
    counts: Sequence[int] = (1, 2), busy: int = 0, turns: int = 6, size: int = 96,
    batch: int = 1, model: str = "tiny-sdxl", models_dir: Path | None = None,
    inference_mode: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Seconds for the same images in one clean process per thread count, turn by turn (with
    ``inference_mode``, also its calls under it: "N inference")."""
    from dropkiln.stages.models import resolve_model

    with tempfile.TemporaryDirectory(prefix="dropkiln-bench-threads-") as scratch:
        root = Path(scratch)
        link_models(root, models_dir)
        folder = resolve_model(model, root / "state" / "models").path
        request = [
            {"prompt": f"a lighthouse, image {n}", "seed": 1 + n, "steps": STEPS,
             "guidance": 5.0, "width": size, "height": size}
            for n in range(IMAGES)
        ]  # fmt: skip
        processes = {count: CleanDiffusers(folder, count) for count in counts}
        arms = {str(count): (count, False) for count in counts}
        if inference_mode:
            arms.update({f"{count} inference": (count, True) for count in counts})
        loops: list[subprocess.Popen[bytes]] = []
        try:
            for name, (count, mode) in arms.items():  # a first call's costs, untimed
                processes[count].render(request, root / name, batch, mode)
            loops = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)
            ]
            time.sleep(1 if busy else 0)
            load_before = os.getloadavg()
            seconds: dict[str, list[float]] = {name: [] for name in arms}
            order = list(arms)
            for turn in range(turns):  # who goes first alternates
                for name in order if turn % 2 == 0 else order[::-1]:
                    count, mode = arms[name]
                    took = processes[count].render(request, root / name, batch, mode)
                    seconds[name].append(round(took, 3))
            load_after = os.getloadavg()
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
            for process in processes.values():
                process.close()
    return {
        "model": model, "size": size, "steps": STEPS, "images": IMAGES, "batch": batch,
        "busy_loops": busy, "turns": turns,
        "seconds": seconds,
        "median_s": {name: statistics.median(values) for name, values in seconds.items()},
        "inference_mode_ratio": {
            str(count): paired_ratio(seconds[f"{count} inference"], seconds[str(count)])
            for count in (counts if inference_mode else ())
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }  # fmt: skip


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m dropkiln.bench.threads")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes as load")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=1, help="images per diffusers call")
    parser.add_argument("--inference-mode", action="store_true",
                        help="also each count calling under torch.inference_mode")  # fmt: skip
    args = parser.parse_args(list(argv))
    counts = [int(part) for part in args.threads.split(",")]
    figures = bench_threads(
        counts, args.busy, args.turns, args.size, args.batch, inference_mode=args.inference_mode
    )
    for name, values in figures["seconds"].items():
        print(f"{name} torch threads: median {figures['median_s'][name]:.3f}s "
              f"({min(values):.3f}-{max(values):.3f}) for {IMAGES} images")  # fmt: skip
    for count, paired in figures["inference_mode_ratio"].items():
        low, high = paired["ci95"]
        print(f"{count} threads, under inference_mode / without: {paired['ratio']:.3f} (the "
              f"median's 95% interval {low:.3f}-{high:.3f})")  # fmt: skip
    print(f"{args.busy} busy loops; load average before {figures['load_average_before']}, "
          f"after {figures['load_average_after']}")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
