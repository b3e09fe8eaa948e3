"""Several executors on one store, with kill -9 and SIGSTOP/SIGCONT of the ones running jobs.

What the job queues built on PostgreSQL promise (procrastinate, Oban, graphile-worker), and
issue 15 asks of dropkiln: every job ends exactly once however its executors die or
stall; a paused executor's job is taken over once its lease runs out; and the paused one,
when it wakes, writes nothing more for the job it lost. `store check` passes after.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from tests.reliability.executors import (
    LEASES,
    Executors,
    PostgresReader,
    drop_prompt_files,
    executor_device,
    writes_without_a_lease,
)
from tests.reliability.home import CONFIG, TERMINAL, TERMINAL_EVENTS, Home
from tests.reliability.pipeline import Outputs, assert_same_outputs, collect_outputs

pytestmark = pytest.mark.slow

Reader = Any  # Home (SQLite) or PostgresReader


def running_on(reader: Reader, device: str | None = None) -> list[dict[str, Any]]:
    jobs = [j for j in reader.jobs() if j["state"] == "running"]
    return [j for j in jobs if device is None or executor_device(j["executor"]) == device]


def wait(condition: Callable[[], bool], timeout: float, what: str, executors: Executors) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        executors.check()
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{executors.logs()}")


def until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def noticed_lost_lease(executors: Executors, device: str, before: int) -> bool:
    return executors.log(device).count("lease lost") > before


def claimed_by(reader: Reader, job_id: str) -> int | None:
    """The pid of the process that claimed the job's latest attempt."""
    claims = [e for e in reader.events_of(job_id) if e["type"] == "JobClaimed"]
    return int(claims[-1]["data"]["pid"]) if claims else None


def interrupted(reader: Reader, job_id: str, attempt: int) -> bool:
    return any(
        e["type"] == "JobInterrupted" and e["data"]["previous_attempt"] == attempt
        for e in reader.events_of(job_id)
    )


def run_with_chaos(
    home: Home, reader: Reader, executors: Executors, files: int, rng: random.Random
) -> dict[str, int]:
    """Drop ``files`` prompt files, then until every job ended: pause the executor of a
    running job past its lease (and check the job was taken over), kill -9 another's and
    restart it. Returns how many of each disturbance landed on a running job."""
    executors.start_all()
    drop_prompt_files(home, files)
    landed = {"paused": 0, "killed": 0, "stalled": 0}
    deadline = time.monotonic() + 40 * files
    while time.monotonic() < deadline:
        executors.check()
        jobs = reader.jobs()
        if len(jobs) >= 2 * files and all(j["state"] in TERMINAL for j in jobs):
            return landed
        busy = running_on(reader)
        if not busy:
            time.sleep(0.2)
            continue
        victim = rng.choice(busy)
        device = executor_device(victim["executor"])
        if device is None or not executors.holds(device, claimed_by(reader, victim["id"])):
            time.sleep(0.2)  # its holder is already dead: its lease is running out
            continue
        # A kill first: it lands on any running job at once, and the job it interrupts runs
        # again once its lease is out, which leaves a running job for the pause (paused
        # first, the takeover could end the last job before a kill found one)
        if landed["killed"] > landed["paused"]:
            executors.pause(device)
            # Another executor takes the job over once the lease runs out (3 s), unless the
            # pause caught the executor inside a write transaction: on SQLite that holds the
            # one write lock until it runs again (PostgreSQL ends such a session after
            # STALLED_WRITER_S), so then it is woken and the pause tried again later.
            taken = until(partial(interrupted, reader, victim["id"], victim["attempt"]), 15)
            if not taken:
                executors.check()
                executors.resume(device)
                landed["stalled"] += 1
                continue
            time.sleep(rng.uniform(0, 1.0))
            lost_before = executors.log(device).count("lease lost")
            executors.resume(device)
            # Awake, it finds its lease gone at its next check and stops the attempt.
            wait(
                partial(noticed_lost_lease, executors, device, lost_before),
                30,
                f"{device} to notice it lost the lease of job {victim['id']}",
                executors,
            )
            landed["paused"] += 1
        else:
            time.sleep(rng.uniform(0, 1.5))
            executors.kill(device)
            landed["killed"] += 1
            time.sleep(rng.uniform(0.2, 1.0))
            executors.start(device)
        time.sleep(rng.uniform(0.5, 2.0))
    raise AssertionError(f"jobs did not all end: {reader.jobs()}\n{executors.logs()}")


def assert_each_job_ended_once_under_its_lease(reader: Reader, files: int) -> None:
    jobs = reader.jobs()
    assert len(jobs) == 2 * files
    assert [j["state"] for j in jobs] == ["succeeded"] * len(jobs), [
        (j["stage"], j["state"], j["error"]) for j in jobs
    ]
    for job in jobs:
        events = reader.events_of(job["id"])
        ends = [e["type"] for e in events if e["type"] in TERMINAL_EVENTS]
        assert ends == ["JobSucceeded"], (job["id"], ends)
        assert writes_without_a_lease(events) == [], (job["id"], [e["type"] for e in events])


def outputs_of(home: Home) -> Outputs:
    """The outputs, less the temp files of writes a kill -9 cut short: with several daemons
    on a root none starts alone, so none sweeps them (README, "Locks"); the finished file
    beside each is compared."""
    outputs = collect_outputs(home.root)
    kept = {p: c for p, c in outputs.files.items() if not p.rsplit("/", 1)[-1].endswith(".part")}
    return Outputs(kept, outputs.root)


def check_store(home: Home) -> None:
    checked = home.cli("store", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def executors_home(home: Home, store_url: str = "") -> Home:
    config = CONFIG + LEASES
    if store_url:
        config = f'store_url = "{store_url}"\n' + config
    return Home(home.root, config)


_UNDISTURBED: dict[int, Outputs] = {}


def undisturbed_outputs(tmp_path_factory: pytest.TempPathFactory, files: int) -> Outputs:
    """The outputs of the same prompt files made by one executor that nothing disturbs."""
    if files not in _UNDISTURBED:
        home = executors_home(Home(tmp_path_factory.mktemp("undisturbed") / "home"))
        executors = Executors(home, 1)
        try:
            executors.start_all()
            drop_prompt_files(home, files)
            wait(
                lambda: (
                    len(jobs := home.jobs()) >= 2 * files
                    and all(j["state"] in TERMINAL for j in jobs)
                ),
                40 * files,
                "the undisturbed run",
                executors,
            )
        finally:
            executors.stop_all()
        assert_each_job_ended_once_under_its_lease(home, files)
        _UNDISTURBED[files] = collect_outputs(home.root)
    return _UNDISTURBED[files]


@pytest.mark.parametrize("files", [4, pytest.param(15, marks=pytest.mark.full)])
def test_two_executors_on_one_sqlite_root(
    home: Home, tmp_path_factory: pytest.TempPathFactory, files: int
) -> None:
    home = executors_home(home)
    executors = Executors(home, 2)
    try:
        landed = run_with_chaos(home, home, executors, files=files, rng=random.Random(15))
    finally:
        executors.stop_all()
    assert landed["paused"] >= 1 and landed["killed"] >= 1, landed
    assert_each_job_ended_once_under_its_lease(home, files)
    check_store(home)
    assert_same_outputs(outputs_of(home), undisturbed_outputs(tmp_path_factory, files))


@pytest.mark.parametrize("files", [pytest.param(15, marks=pytest.mark.full)])
def test_three_executors_on_postgres(
    home: Home, postgres_url: str, tmp_path_factory: pytest.TempPathFactory, files: int
) -> None:
    home = executors_home(home, postgres_url)
    reader = PostgresReader(postgres_url)
    executors = Executors(home, 3)
    try:
        landed = run_with_chaos(home, reader, executors, files=files, rng=random.Random(16))
    finally:
        executors.stop_all()
    assert landed["paused"] >= 1 and landed["killed"] >= 1, landed
    assert_each_job_ended_once_under_its_lease(reader, files)
    check_store(home)
    assert_same_outputs(outputs_of(home), undisturbed_outputs(tmp_path_factory, files))


def test_three_executors_on_postgres_small(
    home: Home, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    test_three_executors_on_postgres(home, postgres_url, tmp_path_factory, files=3)
