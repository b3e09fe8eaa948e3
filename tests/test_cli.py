"""The `dropkiln` command: exit codes, one-line errors, JSON shapes, no torch for reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from dropkiln.cli import main
from dropkiln.store import EventStore
from dropkiln.store.events import JobQueued, JobStarted, JobSubmitted, job_stream


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "home"
    assert run(capsys, "init", str(root))[0] == 0
    return root


def add_job(root: Path, job_id: str, stage: str = "bucket") -> None:
    async def write() -> None:
        async with await EventStore.open(root / "state" / "dropkiln.db") as store:
            submitted = JobSubmitted(
                job_id=job_id, stage=stage, name="cats", lane="cpu", priority=5, spec={}
            )
            await store.append(
                job_stream(job_id), [submitted, JobStarted(attempt=1, memory_rung=0)]
            )

    anyio.run(write)


def test_init_makes_the_home_and_says_what_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "init", str(tmp_path / "h"))
    assert code == 0
    for folder in (
        "drop/datasets",
        "drop/prompts",
        "drop/processed",
        "drop/failed",
        "outputs/loras",
    ):
        assert (tmp_path / "h" / folder).is_dir()
    assert (tmp_path / "h" / "dropkiln.toml").is_file()
    assert (tmp_path / "h" / "state" / "dropkiln.db").is_file()
    assert "dropkiln daemon --root" in out


def test_a_missing_database_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "status", "--root", str(tmp_path / "nowhere"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("dropkiln: error: no dropkiln database")


def test_status_json_has_the_documented_shape(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_job(home, "abc12345")
    code, out, _ = run(capsys, "status", "--json", "--root", str(home))
    assert code == 0
    status = json.loads(out)
    (job,) = status["jobs"]
    assert {"id", "stage", "name", "state", "progress", "attempt"} <= job.keys()
    assert (job["id"], job["stage"], job["state"], job["attempt"]) == (
        "abc12345",
        "bucket",
        "running",
        1,
    )
    assert status["daemon"]["running"] is False and status["paused"] is False


def test_status_says_a_job_waits_for_a_device_class_no_daemon_serves(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def queue_pinned() -> None:
        async with await EventStore.open(home / "state" / "dropkiln.db") as store:
            submitted = JobSubmitted(
                job_id="pinned01", stage="train", name="cats", lane="gpu", priority=0,
                spec={}, device_class="24gb",
            )  # fmt: skip
            await store.append(job_stream("pinned01"), [submitted])

    anyio.run(queue_pinned)
    code, out, _ = run(capsys, "status", "--root", str(home))
    assert code == 0
    assert "runs only on a daemon of device class 24gb (none is running)" in out
    code, out, _ = run(capsys, "status", "--json", "--root", str(home))
    assert json.loads(out)["jobs"][0]["device_class"] == "24gb"


def test_status_names_the_executor_of_a_running_job_when_several_daemons_run(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dropkiln.store.leases import Candidate, claim
    from dropkiln.store.telemetry import record_telemetry

    async def two_daemons_one_claim() -> None:
        async with await EventStore.open(home / "state" / "dropkiln.db") as store:
            submitted = JobSubmitted(
                job_id="claimed1", stage="train", name="cats", lane="gpu", priority=0, spec={}
            )
            await store.append(job_stream("claimed1"), [submitted, JobQueued()])
            for executor in ("box/cuda:0", "box/cuda:1"):
                sample = {"device": "cuda", "executor": executor, "device_class": "cuda"}
                await record_telemetry(store, sample, retention_s=600)
            start = [JobStarted(attempt=1, memory_rung=0)]
            await claim(store, [Candidate("claimed1", 2, 1, start)], "box/cuda:1", lease_s=60)

    anyio.run(two_daemons_one_claim)
    code, out, _ = run(capsys, "status", "--root", str(home))
    assert code == 0
    assert "└ on box/cuda:1" in out


def test_events_json_is_one_object_a_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_job(home, "abc12345")
    code, out, _ = run(capsys, "events", "--json", "--job", "abc", "--root", str(home))
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in lines] == ["JobSubmitted", "JobStarted"]
    assert set(lines[0]) >= {"seq", "stream", "type", "at", "data"}
    code, out, _ = run(
        capsys, "events", "--json", "--since", str(lines[0]["seq"]), "--root", str(home)
    )
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["JobStarted"]


def test_commands_append_command_events(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_job(home, "abc12345")
    assert run(capsys, "cancel", "abc", "--root", str(home))[0] == 0
    assert run(capsys, "pause", "--root", str(home))[0] == 0
    assert run(capsys, "resume", "--root", str(home))[0] == 0
    code, out, _ = run(capsys, "events", "--json", "--root", str(home))
    types = [json.loads(line)["type"] for line in out.splitlines()]
    assert types[-3:] == ["CancelRequested", "QueuePaused", "QueueResumed"]
    code, _, err = run(capsys, "retry", "zzz", "--root", str(home))
    assert code == 1 and "no job 'zzz'" in err


def test_submit_copies_under_a_hidden_name_then_renames(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = tmp_path / "p.toml"
    prompt.write_text('[[image]]\nprompt = "x"\n')
    code, _out, _ = run(capsys, "submit", str(prompt), "--root", str(home))
    assert code == 0
    assert (home / "drop" / "prompts" / "p.toml").read_text() == prompt.read_text()
    assert prompt.exists()
    code, _, err = run(capsys, "submit", str(prompt), "--root", str(home))
    assert code == 1 and "already exists" in err


def test_store_check_and_rebuild(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_job(home, "abc12345")
    code, out, _ = run(capsys, "store", "check", "--root", str(home))
    assert code == 0 and out.startswith("ok: 2 events")
    code, out, _ = run(capsys, "store", "rebuild", "--root", str(home))
    assert code == 0 and "2 events" in out


def test_read_commands_never_import_torch(home: Path) -> None:
    add_job(home, "abc12345")
    probe = (
        "import sys; from dropkiln.cli import main\n"
        f"for args in (['status', '--root', {str(home)!r}], ['events', '--root', {str(home)!r}],"
        f" ['store', 'check', '--root', {str(home)!r}]):\n"
        "    assert main(args) == 0\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    _run_probe(probe)


def test_quick_commands_start_no_event_loop(home: Path) -> None:
    # Importing asyncio and starting anyio's backend was half of `status`'s 0.2 s on the
    # 2-core box: the quick commands read and append in their own thread, and only
    # `events --follow` (which waits for new events) runs an event loop.
    add_job(home, "abc12345")
    probe = (
        "import sys; from dropkiln.cli import main\n"
        f"root = {str(home)!r}\n"
        "for args in (['status', '--root', root], ['status', '--json', '--root', root],\n"
        "             ['events', '--job', 'abc', '--root', root],\n"
        "             ['cancel', 'abc', '--root', root],\n"
        "             ['pause', '--root', root], ['resume', '--root', root]):\n"
        "    assert main(args) == 0, args\n"
        "loaded = [m for m in ('asyncio', 'anyio._backends._asyncio') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    _run_probe(probe)
    written = _events(home)
    assert "CancelRequested" in written and "QueueResumed" in written, written


def _run_probe(probe: str) -> None:
    """Run ``probe`` in a fresh interpreter (sys.modules as a user's command leaves it)."""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def _events(home: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dropkiln", "events", "--root", str(home)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result.stdout


def test_quick_commands_load_neither_sqlalchemy_nor_the_settings(home: Path) -> None:
    """`status`, `events` and `cancel` must answer in a quarter of a second (issue 16): they
    find the database from ROOT alone and read through the stdlib driver. SQLAlchemy
    (0.4 s to import on a busy 2-core box) and pydantic-settings (0.3 s) are for the
    commands that create, migrate or configure."""
    add_job(home, "abc12345")
    probe = (
        "import sys; from dropkiln.cli import main\n"
        f"root = {str(home)!r}\n"
        "for args in (['status', '--root', root], ['status', '--json', '--root', root],\n"
        "             ['events', '--root', root], ['events', '--job', 'abc', '--root', root]):\n"
        "    assert main(args) == 0\n"
        "loaded = [m for m in ('sqlalchemy', 'aiosqlite', 'pydantic_settings', 'dropkiln.config',\n"
        "                      'textual', 'watchfiles') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert main(['cancel', 'abc', '--root', root]) == 0\n"
        "assert main(['pause', '--root', root]) == 0\n"
        "loaded = [m for m in ('pydantic_settings', 'dropkiln.config') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    _run_probe(probe)


def test_commands_are_written_without_sqlalchemy_or_pydantic(home: Path) -> None:
    """Issue 16: writing a command (cancel, retry, pause, resume) went through the
    projections, which imported SQLAlchemy (0.22 s) and the pydantic event models (0.15 s):
    `cancel` took 0.55 s on an idle box against a goal of 0.25 s. The write path for a
    command needs neither; the event it writes is the one the daemon reads back typed."""
    add_job(home, "abc12345")
    probe = (
        "import sys; from dropkiln.cli import main\n"
        f"root = {str(home)!r}\n"
        "for args in (['cancel', 'abc', '--root', root], ['retry', 'abc', '--root', root],\n"
        "             ['pause', '--root', root], ['resume', '--root', root]):\n"
        "    assert main(args) == 0\n"
        "loaded = [m for m in ('sqlalchemy', 'pydantic', 'dropkiln.store.events',\n"
        "                      'dropkiln.store.projections') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    _run_probe(probe)
    code = main(["store", "check", "--root", str(home)])
    assert code == 0


def test_defect11_root_before_the_command_is_honoured(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    add_job(home, "abc12345")
    monkeypatch.chdir(tmp_path)  # ./dropkiln-home must not be what is read
    code, out, err = run(capsys, "--root", str(home), "status", "--json")
    assert code == 0, err
    assert [job["id"] for job in json.loads(out)["jobs"]] == ["abc12345"]
    assert not (tmp_path / "dropkiln-home").exists()
    # Given in both places, the one after the command wins (it is the more specific).
    code, out, _ = run(
        capsys, "--root", str(tmp_path / "x"), "status", "--json", "--root", str(home)
    )
    assert code == 0 and json.loads(out)["jobs"]


def test_defect14_store_rebuild_refuses_while_a_daemon_holds_the_root(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dropkiln.daemon.lock import DaemonLock

    add_job(home, "abc12345")
    with DaemonLock(home / "state" / "daemon.lock"):
        code, out, err = run(capsys, "store", "rebuild", "--root", str(home))
        assert code == 1
        assert "daemon" in err and "running" in err and "stop it" in err
        # check only reads, so it runs beside the daemon.
        assert run(capsys, "store", "check", "--root", str(home))[0] == 0
    code, out, _ = run(capsys, "store", "rebuild", "--root", str(home))
    assert code == 0 and "2 events" in out
