"""The ``dropkiln`` command. Read-only commands never import torch.

``status``, ``events`` and the commands to the daemon must answer in a quarter of a second:
they find the database from ROOT alone (``dropkiln.paths``, not the settings) and import
only the store's read path; everything else is imported by the command that needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from dropkiln import __version__
from dropkiln.paths import Paths, root_from
from dropkiln.store.errors import StoreError

if TYPE_CHECKING:
    from dropkiln.config import Settings
    from dropkiln.store import EventStore


class CommandError(Exception):
    """A one-line reason; the command exits non-zero."""


def _settings(args: argparse.Namespace) -> Settings:
    from dropkiln.config import Settings

    return Settings.load(root=args.root)


def _paths(args: argparse.Namespace) -> Paths:
    """The layout under ROOT, without loading the settings (for the quick commands)."""
    return Paths(root_from(args.root).absolute())


def _run(coro_fn: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    return anyio.run(coro_fn) or 0


async def _open(paths: Paths, store_url: str | None = None) -> EventStore:
    """The root's store: its SQLite file, or the PostgreSQL database ``store_url`` names
    (by default as the settings say, read without loading them)."""
    from dropkiln.store.backend import open_store

    return await open_store(paths.db, paths.store_url if store_url is None else store_url)


# init / daemon / demo / tui -------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from dropkiln.config import DEFAULT_CONFIG_TEXT, Settings

    root = Path(args.path or args.root or "dropkiln-home")
    settings = Settings.load(root=root)
    settings.paths.create()
    if not settings.paths.config.exists():
        settings.paths.config.write_text(DEFAULT_CONFIG_TEXT)

    async def create_db() -> None:
        from dropkiln.store.backend import open_store

        store = await open_store(settings.paths.db, settings.store_url, create=True)
        await store.close()

    anyio.run(create_db)
    from dropkiln.api.token import ensure_token

    ensure_token(settings.paths.api_token)
    r = settings.root
    print(f"dropkiln home ready at {r}")
    print(f"  settings:        {settings.paths.config}")
    print(f"  drop datasets:   {settings.paths.datasets}/NAME/  (images + .txt captions)")
    print(f"  drop prompts:    {settings.paths.prompts}/FILE.toml")
    print(f"  outputs:         {settings.paths.outputs}")
    print(f"  API token:       {settings.paths.api_token}  (for dropkiln serve)")
    print("next:")
    print(
        f"  dropkiln daemon --root {r}      # run in the foreground (or install the systemd unit)"
    )
    print(f"  dropkiln tui --root {r}         # watch it work")
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    import signal

    # A stop asked for while we are still importing and opening the store is honoured
    # once the daemon is up, instead of killing it half-started.
    early: list[str] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda n, _frame: early.append(signal.Signals(n).name))

    from dropkiln.daemon.logs import setup_logging
    from dropkiln.daemon.service import Daemon

    settings = _settings(args)
    if args.device:
        settings.device = args.device
    if args.device_class:
        settings.executor.device_class = args.device_class
    setup_logging(settings.log_level)
    daemon = Daemon(settings, early_stop=early)
    anyio.run(daemon.run)
    if daemon.abandoned:
        # A stage thread that never returned (a hung driver call) would keep the interpreter
        # from exiting; everything is recorded and the job resumes at the next start.
        logging.shutdown()
        os._exit(0)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dropkiln.demo import run_demo

    return run_demo(Path(args.root) if args.root else None, full=args.full)


def cmd_tui(args: argparse.Namespace) -> int:
    from dropkiln.tui import run

    # A missing database is explained on screen, and picked up as soon as it appears.
    settings = _settings(args)
    run(settings.root, poll_interval=max(settings.poll_interval, 0.1))
    return 0


# Read commands --------------------------------------------------------------------------------


def _age(iso: str | None) -> str:
    from datetime import UTC, datetime

    from dropkiln.tui.format import age

    return age((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()) if iso else "-"


def cmd_status(args: argparse.Namespace) -> int:
    paths = _paths(args)

    async def main() -> int:
        from dropkiln.store import (
            daemon_state,
            list_jobs,
            queue_paused,
            status_report,
            waiting_drops,
        )
        from dropkiln.store.telemetry import HEARTBEAT_TIMEOUT_S, device_rooms

        store = await _open(paths)
        try:
            if args.json:
                print(json.dumps(await status_report(store, limit=args.limit)))
                return 0
            jobs = await list_jobs(store, limit=args.limit)
            daemon = await daemon_state(store)
            rooms = await device_rooms(store, HEARTBEAT_TIMEOUT_S)
            served = {r.device_class for r in rooms}
            paused = await queue_paused(store)
            waiting = await waiting_drops(store)
        finally:
            await store.close()
        up = f"running (pid {daemon.pid}, {daemon.device})" if daemon.running() else "not running"
        print(f"daemon: {up} · queue: {'paused' if paused else 'running'}")
        for held in waiting:
            source = Path(held["source"])
            shown = source.relative_to(paths.root) if source.is_relative_to(paths.root) else source
            print(f"waiting: {shown} {held['reason']} (noticed {_age(held['at'])} ago)")
        if not jobs:
            print("no jobs yet: drop a dataset folder or a prompt file into", paths.drop)
            return 0
        from dropkiln.store.vocabulary import JobState
        from dropkiln.tui.format import unique_prefixes

        # Ids are 128-bit; the shortest unambiguous prefix is what `cancel`/`retry` need.
        short = unique_prefixes(job.id for job in jobs)
        w = max(9, *(len(prefix) + 1 for prefix in short.values()))
        print(
            f"{'ID':{w}} {'STAGE':9} {'NAME':20} {'STATE':10} {'PROGRESS':>8} {'TRY':>3} {'AGE':>5}"
        )
        for job in jobs:
            progress = f"{job.progress * 100:.0f}%"
            print(
                f"{short[job.id]:{w}} {job.stage:9} {job.name[:20]:20} {job.state:10} "
                f"{progress:>8} {job.attempt:>3} {_age(job.created_at):>5}"
            )
            if job.state == JobState.FAILED and job.error:
                print(f"{'':{w}} └ {job.error.splitlines()[0][:100]}")
            elif job.state == JobState.RUNNING and job.executor and len(rooms) > 1:
                print(f"{'':{w}} └ on {job.executor}")
            elif job.device_class and job.state in (JobState.QUEUED, JobState.WAITING):
                # Otherwise a job pinned to a class no daemon serves just sits there.
                none = "" if job.device_class in served else " (none is running)"
                print(f"{'':{w}} └ runs only on a daemon of device class {job.device_class}{none}")
        return 0

    return _run(main)


def _event_line(event: Any) -> str:
    from dropkiln.tui.format import describe

    return f"{event.seq:>7} {event.at[11:23]} {event.stream:16} {event.type:16} {describe(event)}"


def cmd_events(args: argparse.Namespace) -> int:
    paths = _paths(args)

    async def main() -> int:
        from dropkiln.store import find_job

        store = await _open(paths)
        try:
            stream = None
            if args.job:
                stream = f"job:{(await find_job(store, args.job)).id}"
            since = args.since
            if since is None:
                since = (
                    0 if args.follow is False or args.job else max(0, await store.last_seq() - 20)
                )
            printer = (lambda e: json.dumps(e.as_json())) if args.json else _event_line
            if not args.follow:
                while batch := await store.read(since, stream=stream, limit=1000):
                    for event in batch:
                        print(printer(event))
                    since = batch[-1].seq
                return 0
            async for event in store.tail(since, stream=stream):
                print(printer(event), flush=True)
        finally:
            await store.close()
        return 0

    try:
        return _run(main)
    except KeyboardInterrupt:
        return 0


# Commands to the daemon -----------------------------------------------------------------------


def cmd_command(args: argparse.Namespace) -> int:
    """cancel / retry a job, pause / resume the queue: a command event the daemon obeys."""
    paths = _paths(args)

    async def main() -> int:
        from dropkiln.store import request_command

        store = await _open(paths)
        try:
            job = getattr(args, "job", None)
            target = await request_command(store, args.command, job, by="cli")
        finally:
            await store.close()
        what = f" job {target.id} ({target.stage} {target.name}, {target.state})" if target else ""
        print(f"{args.command}{what}: requested")
        return 0

    return _run(main)


def cmd_submit(args: argparse.Namespace) -> int:
    from dropkiln.submit import submit

    settings = _settings(args)
    target = submit(Path(args.path), settings, kind=args.kind)
    print(f"copied to {target}; the daemon takes it once it has settled")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a prompt file or dataset as the daemon would, without dropping it."""
    from dropkiln.daemon.planner import DropRejection, check_drop
    from dropkiln.submit import guess_kind

    settings = _settings(args)
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path}: no such file or folder")
    kind = args.kind or guess_kind(path)

    async def main() -> int:
        store = await _open(settings.paths, settings.store_url)
        try:
            parsed = await check_drop(settings, store, path, kind)
        except DropRejection as exc:
            raise CommandError(f"{path.name}: the daemon would reject it: {exc}") from None
        finally:
            await store.close()
        print(f"ok: {path.name} is a valid {kind} drop ({parsed.files} file(s), {parsed.name!r})")
        return 0

    return _run(main)


def cmd_store(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "rebuild":
        return _rebuild(settings)
    if args.action == "copy":
        return _copy(settings, args.to)

    async def main() -> int:
        from dropkiln.store import check

        store = await _open(settings.paths, settings.store_url)
        try:
            report = await check(store)
        finally:
            await store.close()
        rows = ", ".join(f"{n} {t}" for t, n in report.rows.items())
        if report.ok:
            print(
                f"ok: {report.events} events follow the job state machine and replay to "
                f"the live projections ({rows})"
            )
            return 0
        for line in [*report.violations, *report.differences]:
            print(line)
        raise CommandError(
            f"{len(report.violations)} state machine violation(s), "
            f"{len(report.differences)} difference(s) between events and projections"
        )

    return _run(main)


def _copy(settings: Settings, to: str | None) -> int:
    """Copy this root's store into a new one (SQLite to PostgreSQL), with the daemon stopped:
    events it appended during the copy would not be in the copy."""
    from dropkiln.daemon.lock import AlreadyRunning, DaemonLock

    if not to:
        raise CommandError("store copy needs --to URL (e.g. postgresql://user@host/dropkiln)")

    async def main() -> int:
        from dropkiln.store import check
        from dropkiln.store.backend import open_store
        from dropkiln.store.copy import copy_store

        source = await _open(settings.paths, settings.store_url)
        try:
            target = await open_store(settings.paths.db, to, create=True)
            try:
                copied = await copy_store(source, target)
                want, have = await check(source), await check(target)
            finally:
                await target.close()
        finally:
            await source.close()
        print(f"copied {copied.events} events (up to seq {copied.last_seq}) and replayed them")
        if (have.ok, have.events, have.rows) != (want.ok, want.events, want.rows):
            raise CommandError(
                f"store check differs after the copy: source {want.events} events "
                f"{want.rows} ok={want.ok}, copy {have.events} events {have.rows} ok={have.ok}"
            )
        print(f"store check equal on both: {have.events} events, {have.rows}, ok={have.ok}")
        print("next: put that URL in dropkiln.toml as store_url, then start the daemons")
        return 0

    try:
        with DaemonLock(settings.paths.lock):
            return _run(main)
    except AlreadyRunning as exc:
        raise CommandError(f"{exc}: stop it before 'store copy'") from None


def _rebuild(settings: Settings) -> int:
    """Rebuild holding the daemon's lock: a rebuild rewrites every projection row in one
    write transaction, longer than a running daemon's busy timeout, so its next append
    would fail. The lock also keeps a daemon from starting until the rebuild is done."""
    from dropkiln.daemon.lock import AlreadyRunning, DaemonLock

    async def main() -> int:
        from dropkiln.store import rebuild

        store = await _open(settings.paths, settings.store_url)
        try:
            count = await rebuild(store)
        finally:
            await store.close()
        print(f"rebuilt jobs, drops and artifacts from {count} events")
        return 0

    try:
        with DaemonLock(settings.paths.lock):
            return _run(main)
    except AlreadyRunning as exc:
        raise CommandError(
            f"{exc}: stop it before 'store rebuild' ('store check' runs beside it)"
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from dropkiln.api.serve import ServeOptions, ServeRefused, prepare, serve
    from dropkiln.daemon.logs import setup_logging

    settings = _settings(args)
    options = ServeOptions(
        host=args.host or settings.api.host,
        port=args.port or settings.api.port,
        public=args.public,
        rotate_token=args.rotate_token,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        trusted_proxy=args.trusted_proxy,
    )
    try:
        notes = prepare(settings, options)
    except ServeRefused as exc:
        raise CommandError(str(exc)) from None
    setup_logging(settings.log_level)
    for note in notes:
        print(note, file=sys.stderr)
    serve(settings, options)
    return 0


def cmd_api_token(args: argparse.Namespace) -> int:
    from dropkiln.api.token import read_token, write_token

    path = _settings(args).paths.api_token
    if args.action == "rotate":
        write_token(path)
        print(f"new API token in {path}; the old one no longer works (no restart needed)")
        return 0
    token = read_token(path)
    if token is None:
        raise CommandError(f"no API token in {path}: run 'dropkiln api-token rotate'")
    print(token)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dropkiln.bench.cli import run_bench

    return run_bench(args, _settings(args))


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


if __name__ == "__main__":
    sys.exit(main())
