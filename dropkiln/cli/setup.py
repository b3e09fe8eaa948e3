"""Commands that set up and run things here: ``init``, ``daemon``, ``demo``, ``tui``,
``check`` and ``bench``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dropkiln.cli.common import CommandError, open_root_store, run_async, settings_of

if TYPE_CHECKING:
    pass


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

    run_async(create_db)
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
    import logging
    import signal

    import anyio

    # A stop asked for while we are still importing and opening the store is honoured
    # once the daemon is up, instead of killing it half-started.
    early: list[str] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda n, _frame: early.append(signal.Signals(n).name))

    from dropkiln.daemon.logs import setup_logging
    from dropkiln.daemon.service import Daemon

    settings = settings_of(args)
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
    settings = settings_of(args)
    run(settings.root, poll_interval=max(settings.poll_interval, 0.1))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a prompt file or dataset as the daemon would, without dropping it."""
    from dropkiln.daemon.drops import DropRejection
    from dropkiln.daemon.planner import check_drop
    from dropkiln.submit import guess_kind

    settings = settings_of(args)
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path}: no such file or folder")
    kind = args.kind or guess_kind(path)

    async def main() -> int:
        store = await open_root_store(settings.paths, settings.store_url)
        try:
            parsed = await check_drop(settings, store, path, kind)
        except DropRejection as exc:
            raise CommandError(f"{path.name}: the daemon would reject it: {exc}") from None
        finally:
            await store.close()
        print(f"ok: {path.name} is a valid {kind} drop ({parsed.files} file(s), {parsed.name!r})")
        return 0

    return run_async(main)


def cmd_bench(args: argparse.Namespace) -> int:
    from dropkiln.bench.cli import run_bench

    return run_bench(args, settings_of(args))
