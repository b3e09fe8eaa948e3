"""The quick commands: ``status`` and ``events`` read the store, and ``cancel``, ``pause``,
``resume`` and ``retry`` append a command to it. None of them loads the settings or imports
torch: each must answer in a quarter of a second. ``submit`` copies a drop in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dropkiln.cli.common import open_root_store, paths_of, run_async, run_inline, settings_of

# Read commands --------------------------------------------------------------------------------


def _age(iso: str | None) -> str:
    from datetime import UTC, datetime

    from dropkiln.tui.format import age

    return age((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()) if iso else "-"


def cmd_status(args: argparse.Namespace) -> int:
    paths = paths_of(args)

    async def main() -> int:
        from dropkiln.store import (
            daemon_state,
            list_jobs,
            queue_paused,
            status_report,
            waiting_drops,
        )
        from dropkiln.store.telemetry import HEARTBEAT_TIMEOUT_S, device_rooms

        store = await open_root_store(paths, inline=True)
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

    return run_inline(main)


def _event_line(event: Any) -> str:
    from dropkiln.tui.format import describe

    return f"{event.seq:>7} {event.at[11:23]} {event.stream:16} {event.type:16} {describe(event)}"


def cmd_events(args: argparse.Namespace) -> int:
    paths = paths_of(args)

    async def main() -> int:
        from dropkiln.store import find_job

        store = await open_root_store(paths, inline=not args.follow)
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
        return run_async(main) if args.follow else run_inline(main)
    except KeyboardInterrupt:
        return 0


# Commands to the daemon -----------------------------------------------------------------------


def cmd_command(args: argparse.Namespace) -> int:
    """cancel / retry a job, pause / resume the queue: a command event the daemon obeys."""
    paths = paths_of(args)

    async def main() -> int:
        from dropkiln.store import request_command

        store = await open_root_store(paths, inline=True)
        try:
            job = getattr(args, "job", None)
            target = await request_command(store, args.command, job, by="cli")
        finally:
            await store.close()
        what = f" job {target.id} ({target.stage} {target.name}, {target.state})" if target else ""
        print(f"{args.command}{what}: requested")
        return 0

    return run_inline(main)


def cmd_submit(args: argparse.Namespace) -> int:
    from dropkiln.submit import submit

    settings = settings_of(args)
    target = submit(Path(args.path), settings, kind=args.kind)
    print(f"copied to {target}; the daemon takes it once it has settled")
    return 0
