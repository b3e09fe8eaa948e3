"""The ``dropkiln`` command. Read-only commands never import torch.

``status``, ``events`` and the commands to the daemon must answer in a quarter of a second:
they find the database from ROOT alone (``dropkiln.paths``, not the settings) and import
only the store's read path; everything else is imported by the command that needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dropkiln import __version__
from dropkiln.cli.admin import cmd_api_token, cmd_serve, cmd_store
from dropkiln.cli.common import CommandError
from dropkiln.cli.read import cmd_command, cmd_events, cmd_status, cmd_submit
from dropkiln.cli.setup import cmd_bench, cmd_check, cmd_daemon, cmd_demo, cmd_init, cmd_tui
from dropkiln.store.errors import StoreError

# Parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    root_help = "dropkiln home (default: $DROPKILN_ROOT or ./dropkiln-home)"
    parser = argparse.ArgumentParser(
        prog="dropkiln",
        description="Drop a dataset, get a LoRA; drop a prompt file, get images and a video.",
    )
    parser.add_argument("--root", help=root_help, default=None)
    # After the command too; SUPPRESS keeps a subcommand from resetting a --root given
    # before it (`dropkiln --root X status`) to its own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help=root_help, default=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"dropkiln {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> Any:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    p = add("init", cmd_init, "create a dropkiln home: settings, folders, database")
    p.add_argument("path", nargs="?", help="where (default: --root or ./dropkiln-home)")
    p = add("daemon", cmd_daemon, "run the daemon in the foreground")
    p.add_argument(
        "--device",
        help="the device this daemon runs on: cuda:N (one daemon per GPU on one root), cpu, "
        "cpu:N (another CPU executor); default: the device setting",
    )
    p.add_argument(
        "--device-class",
        help="this daemon's device class, which drops may pin their GPU jobs to "
        "(default: [executor] device_class, else the device's type: cuda, cpu)",
    )
    p = add("demo", cmd_demo, "run the whole pipeline on a generated sample, end to end")
    p.add_argument(
        "--full", action="store_true", help="also one contact sheet per generation feature"
    )
    p = add("status", cmd_status, "the daemon and the jobs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs (default 50)")
    p = add("events", cmd_events, "the event log")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument("--job", help="only this job's events (id or prefix)")
    p.add_argument("--since", type=int, help="only events after this seq")
    p = add("submit", cmd_submit, "drop a dataset folder, zip or prompt file (copies it)")
    p.add_argument("path")
    p.add_argument("--kind", choices=["dataset", "prompts"], help="default: guessed from PATH")
    p = add("check", cmd_check, "validate a prompt file or dataset folder without dropping it")
    p.add_argument("path")
    p.add_argument("--kind", choices=["dataset", "prompts"], help="default: guessed from PATH")
    p = add("cancel", cmd_command, "cancel a job (a running one stops at its next check)")
    p.add_argument("job")
    p = add("retry", cmd_command, "requeue a failed or cancelled job")
    p.add_argument("job")
    add("pause", cmd_command, "stop starting new jobs (running ones finish)")
    add("resume", cmd_command, "start jobs again")
    add("tui", cmd_tui, "the dashboard")
    p = add("serve", cmd_serve, "the HTTP API (separate from the daemon; see README)")
    p.add_argument("--host", help="address to listen on (default: [api] host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: [api] port, 8321)")
    p.add_argument(
        "--public", action="store_true", help="allow a non-loopback --host (needs a token)"
    )
    p.add_argument("--rotate-token", action="store_true", help="make a new token first")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="and this private key (PEM)")
    p.add_argument(
        "--trusted-proxy", help="a reverse proxy's IP whose X-Forwarded-For names the client"
    )
    p = add("api-token", cmd_api_token, "print or rotate the HTTP API's bearer token")
    p.add_argument("action", choices=["show", "rotate"], nargs="?", default="show")
    p = add("store", cmd_store, "maintain the event store")
    p.add_argument("action", choices=["rebuild", "check", "copy"])
    p.add_argument("--to", help="copy only: the new store's URL (postgresql://…)")
    p = add("bench", cmd_bench, "measure speed against baselines (see README)")
    p.add_argument(
        "suite",
        nargs="?",
        default="store",
        help="store, bucket, cache, train, generate, video, daemon, preempt, api, scaleout, "
        "idle, cli or all (default store); or compare A.json B.json",
    )
    p.add_argument("files", nargs="*", help="compare only: A.json B.json")
    p.add_argument("--model", help="model for cache/train/generate/daemon (default: settings)")
    p.add_argument("--resolution", type=int, help="image size in pixels (suite default)")
    p.add_argument("--steps", type=int, help="training steps / denoising steps")
    p.add_argument(
        "--batch-sizes",
        help="sweep, e.g. 1,2,4: train micro-batch, generate images per call, cache VAE batch",
    )
    p.add_argument("--repeats", type=int, help="timed repetitions (suite default)")
    p.add_argument("--warmup", type=int, help="untimed warm-up: train steps, generate/daemon runs")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: settings)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--events", type=int, help="store: events in the status store (1000000); api: jobs (10000)"
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler trace of the hot loop")
    p.add_argument("--quick", action="store_true", help="small sizes, for a fast look")
    p.add_argument("--out", help="report folder (default ROOT/outputs/bench/DATE-TIME)")
    p.add_argument("--json", dest="json_file", help="also write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (CommandError, StoreError, FileNotFoundError, FileExistsError, ValueError) as exc:
        from pydantic import ValidationError  # only now: most commands never load pydantic

        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            message = f"invalid setting {where}: {first['msg']}"
        else:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"dropkiln: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`dropkiln events | head`): stop quietly, like other tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from dropkiln.daemon.lock import AlreadyRunning

        if isinstance(exc, AlreadyRunning):
            print(f"dropkiln: error: {exc}", file=sys.stderr)
            return 1
        raise
