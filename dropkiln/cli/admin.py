"""Keeping the store and serving it: ``store check|rebuild|copy``, ``serve``, ``api-token``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from dropkiln.cli.common import CommandError, open_root_store, run_async, settings_of

if TYPE_CHECKING:
    from dropkiln.config import Settings


def cmd_store(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.action == "rebuild":
        return _rebuild(settings)
    if args.action == "copy":
        return _copy(settings, args.to)

    async def main() -> int:
        from dropkiln.store import check

        store = await open_root_store(settings.paths, settings.store_url)
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

    return run_async(main)


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

        source = await open_root_store(settings.paths, settings.store_url)
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
            return run_async(main)
    except AlreadyRunning as exc:
        raise CommandError(f"{exc}: stop it before 'store copy'") from None


def _rebuild(settings: Settings) -> int:
    """Rebuild holding the daemon's lock: a rebuild rewrites every projection row in one
    write transaction, longer than a running daemon's busy timeout, so its next append
    would fail. The lock also keeps a daemon from starting until the rebuild is done."""
    from dropkiln.daemon.lock import AlreadyRunning, DaemonLock

    async def main() -> int:
        from dropkiln.store import rebuild

        store = await open_root_store(settings.paths, settings.store_url)
        try:
            count = await rebuild(store)
        finally:
            await store.close()
        print(f"rebuilt jobs, drops and artifacts from {count} events")
        return 0

    try:
        with DaemonLock(settings.paths.lock):
            return run_async(main)
    except AlreadyRunning as exc:
        raise CommandError(
            f"{exc}: stop it before 'store rebuild' ('store check' runs beside it)"
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from dropkiln.api.serve import ServeOptions, ServeRefused, prepare, serve
    from dropkiln.daemon.logs import setup_logging

    settings = settings_of(args)
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

    path = settings_of(args).paths.api_token
    if args.action == "rotate":
        write_token(path)
        print(f"new API token in {path}; the old one no longer works (no restart needed)")
        return 0
    token = read_token(path)
    if token is None:
        raise CommandError(f"no API token in {path}: run 'dropkiln api-token rotate'")
    print(token)
    return 0
