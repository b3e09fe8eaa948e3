"""A ``dropkiln daemon`` as a child process of a benchmark: started once its store says it is
serving, stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import anyio

from dropkiln.config import Settings

POLL_S = 0.2


def start_daemon(settings: Settings, environment: dict[str, str]) -> subprocess.Popen[bytes]:
    """`dropkiln daemon --root ROOT` as a child process, once its store says it is serving."""
    log = open(settings.root / "daemon.log", "ab")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen(
        [sys.executable, "-m", "dropkiln", "daemon", "--root", str(settings.root)],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 120
    while not anyio.run(_serving, settings, process.pid):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the daemon did not start; see {settings.root}/daemon.log")
        time.sleep(POLL_S)
    return process


async def _serving(settings: Settings, pid: int) -> bool:
    from dropkiln.store import EventStore, StoreError, daemon_state

    try:
        store = await EventStore.open(settings.paths.db)
    except StoreError:
        return False  # not made yet, or the daemon is making it now
    try:
        state = await daemon_state(store)
    finally:
        await store.close()
    return state.running() and state.pid == pid


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the daemon has not stopped within a minute."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
