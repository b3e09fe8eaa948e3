"""The decode pool's worker processes do not outlive the daemon, even after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

OWNER = r"""
import os, signal
import psutil
from dropkiln.stages.decode_pool import new_pool

if __name__ == "__main__":
    pool = new_pool(1)
    worker = pool.submit(os.getpid).result()
    print(worker, psutil.Process(worker).ppid(), flush=True)  # the worker, its fork server
    os.kill(os.getpid(), signal.SIGKILL)  # the daemon killed with its pool still open
"""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux 5.3+)")
def test_a_killed_owner_leaves_no_worker_or_fork_server_behind(tmp_path: Path) -> None:
    # Measured before the fix: the worker and the fork server both waited forever.
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    out = tmp_path / "owner.out"
    with out.open("w") as stdout:  # a file, not a pipe: survivors would hold a pipe open
        owner = subprocess.run([sys.executable, str(script)], stdout=stdout, timeout=60)
    assert owner.returncode == -signal.SIGKILL
    left = [int(pid) for pid in out.read_text().split()]  # the worker and its fork server
    assert len(left) == 2 and os.getpid() not in left
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(_running, left)):
        time.sleep(0.05)
    alive = [pid for pid in left if _running(pid)]
    for pid in alive:  # not left to the next test either
        psutil.Process(pid).kill()
    assert not alive, "the pool's processes outlived their owner's SIGKILL"
