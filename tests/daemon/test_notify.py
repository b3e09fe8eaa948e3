"""The notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dropkiln.daemon.notify import SystemdNotifier, keep_extending_timeout, watchdog_loop

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        """Every datagram received so far, in order."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "notify"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dk") as short:
        yield Path(short) / "notify"


@pytest.fixture
def systemd(socket_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(socket_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(socket_path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield fake
    fake.close()


def test_each_message_is_one_datagram_with_the_exact_payload(systemd: FakeSystemd) -> None:
    with SystemdNotifier() as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert notifier.status("training cats: step 250/2000")
        assert notifier.watchdog()
        assert notifier.extend_timeout(30)
        assert notifier.extend_timeout(2.5)
        assert notifier.stopping()
        assert notifier.ready(status="serving")
        assert notifier.stopping(status="checkpointing job 7")

    assert systemd.messages() == [
        "READY=1",
        "STATUS=training cats: step 250/2000",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=30000000",
        "EXTEND_TIMEOUT_USEC=2500000",
        "STOPPING=1",
        "READY=1\nSTATUS=serving",
        "STOPPING=1\nSTATUS=checkpointing job 7",
    ]


def test_a_newline_in_a_status_cannot_smuggle_in_another_field(systemd: FakeSystemd) -> None:
    with SystemdNotifier() as notifier:
        notifier.status("bad drop name\nREADY=1")

    assert systemd.messages() == ["STATUS=bad drop name READY=1"]


def test_reloading_carries_the_monotonic_timestamp(systemd: FakeSystemd) -> None:
    with SystemdNotifier() as notifier:
        notifier.reloading()

    [message] = systemd.messages()
    reloading, timestamp = message.split("\n")
    assert reloading == "RELOADING=1"
    key, _, usec = timestamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert int(usec) > 0


def test_abstract_socket_names_start_with_at(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dropkiln-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        with SystemdNotifier() as notifier:
            assert notifier.ready()
        assert fake.messages() == ["READY=1"]
    finally:
        fake.close()


def test_without_notify_socket_every_call_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()

    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("idle")
    assert not notifier.watchdog()
    assert not notifier.extend_timeout(10)
    assert not notifier.stopping()


@pytest.mark.parametrize("value", ["", "@", "vsock:2:1234", "relative/path"])
def test_an_address_that_is_not_af_unix_turns_notify_off(value: str) -> None:
    assert not SystemdNotifier({"NOTIFY_SOCKET": value}).enabled


def test_a_vanished_socket_never_raises_is_logged_once_and_recovers(
    systemd: FakeSystemd, socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SystemdNotifier() as notifier:
        assert notifier.ready()
        systemd.close()
        socket_path.unlink()

        with caplog.at_level(logging.DEBUG, logger="dropkiln.daemon.notify"):
            assert not notifier.watchdog()
            assert not notifier.status("still here")
            assert not notifier.stopping()
        unusable = [r for r in caplog.records if "unusable" in r.getMessage()]
        assert len(unusable) == 1
        assert unusable[0].levelno == logging.DEBUG

        # systemd re-executed itself and bound the socket again.
        reborn = FakeSystemd(str(socket_path))
        try:
            assert notifier.watchdog()
            assert reborn.messages() == ["WATCHDOG=1"]
        finally:
            reborn.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert SystemdNotifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval() == 30.0
    assert SystemdNotifier({"WATCHDOG_USEC": "100000"}).watchdog_interval() == 0.05


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_PID": str(os.getpid())},
    ],
)
def test_no_watchdog_without_a_positive_watchdog_usec(env: dict[str, str]) -> None:
    assert SystemdNotifier(env).watchdog_interval() is None


def test_watchdog_pid_must_be_this_process() -> None:
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    someone_elses = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}

    assert SystemdNotifier(mine).watchdog_interval() == 1.0
    assert SystemdNotifier(someone_elses).watchdog_interval() is None


async def test_watchdog_loop_pings_at_half_the_interval_until_cancelled(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # pings every 0.05 s
    with SystemdNotifier() as notifier, anyio.move_on_after(0.5):
        await watchdog_loop(notifier)
    pings = systemd.messages()

    # anyio.sleep never returns early, so 0.5 s holds at most 11 pings; a loaded machine may
    # delay some, but several must have gone out.
    assert 3 <= len(pings) <= 11
    assert set(pings) == {"WATCHDOG=1"}
    await anyio.sleep(0.15)
    assert systemd.messages() == [], "pings continued after cancellation"


async def test_watchdog_loop_returns_at_once_when_not_watched(systemd: FakeSystemd) -> None:
    with SystemdNotifier() as notifier, anyio.fail_after(1):
        await watchdog_loop(notifier)

    assert systemd.messages() == []


async def test_keep_extending_timeout_pushes_the_deadline_while_the_body_runs(
    systemd: FakeSystemd,
) -> None:
    with SystemdNotifier() as notifier:
        async with keep_extending_timeout(notifier, seconds=0.2):
            await anyio.sleep(0.45)  # the extension on entry, then one every 0.1 s
    extensions = systemd.messages()

    assert 2 <= len(extensions) <= 5
    assert set(extensions) == {"EXTEND_TIMEOUT_USEC=200000"}
    await anyio.sleep(0.25)
    assert systemd.messages() == [], "extensions continued after the body finished"


async def test_keep_extending_timeout_stops_when_the_body_raises(systemd: FakeSystemd) -> None:
    with SystemdNotifier() as notifier, pytest.raises(RuntimeError, match="checkpoint failed"):
        async with keep_extending_timeout(notifier, seconds=0.1):
            raise RuntimeError("checkpoint failed")
    await anyio.sleep(0.15)
    assert systemd.messages() == ["EXTEND_TIMEOUT_USEC=100000"]


async def test_keep_extending_timeout_lets_an_outer_cancellation_through(
    systemd: FakeSystemd,
) -> None:
    with SystemdNotifier() as notifier, anyio.fail_after(2):
        with anyio.move_on_after(0.1) as scope:
            async with keep_extending_timeout(notifier, seconds=30):
                await anyio.sleep(10)
    assert scope.cancelled_caught
    assert systemd.messages() == ["EXTEND_TIMEOUT_USEC=30000000"]


async def test_defect13_the_stop_timeout_is_not_extended_without_progress(
    systemd: FakeSystemd,
) -> None:
    with SystemdNotifier() as notifier:
        async with keep_extending_timeout(notifier, seconds=0.1, progressing=lambda: False):
            await anyio.sleep(0.45)
    # the one on entry; then the stage is seen to make no progress and nothing more is asked
    assert systemd.messages() == ["EXTEND_TIMEOUT_USEC=100000"]


async def test_defect13_the_stop_timeout_is_extended_for_at_most_limit_s(
    systemd: FakeSystemd,
) -> None:
    with SystemdNotifier() as notifier:
        async with keep_extending_timeout(notifier, seconds=0.1, limit_s=0.2):
            await anyio.sleep(0.6)
    extensions = [int(m.split("=")[1]) for m in systemd.messages()]
    # Each sets the deadline to now + its value: they are cut short so that the deadline
    # never passes limit_s after the start, and then stop (0.6 s would hold ~11 at 0.05 s).
    assert 2 <= len(extensions) <= 4, extensions
    assert extensions[0] == 100_000 and max(extensions) <= 100_000
    assert extensions[-1] < 100_000


async def test_defect13_the_watchdog_is_not_pinged_while_a_stage_is_hung(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # pings every 0.05 s
    hung: list[str | None] = [None]
    with SystemdNotifier() as notifier, anyio.move_on_after(0.6):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog_loop, notifier, lambda: hung[0])
            await anyio.sleep(0.2)
            assert set(systemd.messages()) == {"WATCHDOG=1"}
            hung[0] = "train job x made no progress for 900 s"
            await anyio.sleep(0.06)
            systemd.messages()
            await anyio.sleep(0.2)
            assert systemd.messages() == []  # systemd's WatchdogSec now restarts the daemon
            hung[0] = None
            await anyio.sleep(0.15)
            assert "WATCHDOG=1" in systemd.messages()
            tg.cancel_scope.cancel()
