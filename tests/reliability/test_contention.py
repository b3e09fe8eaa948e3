"""Readers and writers at once: the daemon running the pipeline and small drops, a second
process appending as fast as it can, three `dropkiln events --follow --json` and the
dashboard reading. Nobody sees "database is locked"; every reader gets every event once, in
order."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dropkiln.tui import DropkilnApp
from dropkiln.tui.tail import LogTail
from tests.reliability.home import TERMINAL, Home
from tests.reliability.pipeline import JOBS, PromptDropper, drop_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FOLLOWERS = 3
SMALL_DROPS = 8
WRITER_SECONDS = 8.0
LOCKED = "database is locked"


async def until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _ctrl_c_stops() -> None:
    """In the follower, before it starts: SIGINT as a terminal gives it. A shell that starts
    the test run in the background (``pytest … &`` without job control) ignores SIGINT,
    every child inherits that, and a follower would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _seqs(path: Path) -> list[int]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["seq"] for line in lines if line.strip()]


async def test_no_reader_is_locked_out_or_misses_an_event(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    db = home.root / "state" / "dropkiln.db"
    followers: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    writer: subprocess.Popen[str] | None = None
    home.start()
    try:
        home.wait_serving()
        for number in range(FOLLOWERS):
            out, err = tmp_path / f"follower{number}.out", tmp_path / f"follower{number}.err"
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dropkiln", "events", "--follow", "--json",
                     "--since", "0", "--root", str(home.root)],
                    env=home.env, stdout=stdout, stderr=stderr, preexec_fn=_ctrl_c_stops,
                )  # fmt: skip
            followers.append((proc, out, err))
        app = DropkilnApp(db, poll_interval=0.05, clock=time.time)
        seen: list[int] = []
        problems: list[str] = []

        def record(before: LogTail, tail: LogTail) -> None:
            # What each poll added to the dashboard's tail; a lost batch leaves a gap.
            seen.extend(event.seq for event in tail.after(before.upto))

        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.loaded, 30, "the dashboard to load")
            seen.extend(event.seq for event in app.log_tail.events)
            app.watch(app, "log_tail", record, init=False)
            writer = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.writer", str(db), str(WRITER_SECONDS)],
                cwd=REPO, env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            prompts = PromptDropper()
            drop_dataset(home)
            for number in range(SMALL_DROPS):
                small = home.staging(f"small{number}.txt")
                small.write_text(f"a small picture number {number}\n")
                home.drop(small, "prompts")

            def everything_ended() -> bool:
                prompts.poll(home)
                if app.problem:
                    problems.append(app.problem)
                jobs = home.jobs()
                done = all(job["state"] in TERMINAL for job in jobs)
                return len(jobs) >= JOBS + SMALL_DROPS and done and writer.poll() is not None

            await until(everything_ended, 300, "the pipeline, the small drops and the writer")
            assert home.terminate() == 0
            last = home.last_seq()
            await until(lambda: bool(seen) and seen[-1] >= last, 120, "the dashboard to catch up")
            for _, out, _ in followers:
                await until(lambda out=out: (_seqs(out) or [0])[-1] >= last, 120, "a follower")
            await pilot.pause()
            problems += [app.problem] if app.problem else []
        for proc, _, _ in followers:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) in (0, 130)
    finally:
        home.stop()
        for proc, _, _ in followers:
            if proc.poll() is None:
                proc.kill()
        if writer is not None and writer.poll() is None:
            writer.kill()

    store = [event["seq"] for event in home.events()]
    assert store == sorted(set(store))
    appended, writer_errors = writer.communicate()
    assert int(appended) > 500, "the writer hardly wrote"
    assert LOCKED not in writer_errors and not writer_errors.strip(), writer_errors
    for _, out, err in followers:
        got = _seqs(out)
        assert got == store, f"a follower missed {len(set(store) - set(got))} events"
        assert not err.read_text().strip(), err.read_text()
    assert seen == store[store.index(seen[0]) :], "the dashboard missed or reordered events"
    assert seen[0] == store[0]
    assert not [p for p in problems if LOCKED in p], problems
    assert not problems, problems
    log = home.log_text()
    assert LOCKED not in log and "Traceback" not in log, log[-3000:]
    check = home.cli("store", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    print(f"{len(store)} events ({appended.strip()} from the writer), {FOLLOWERS} followers "
          "and the dashboard read them all")  # fmt: skip
