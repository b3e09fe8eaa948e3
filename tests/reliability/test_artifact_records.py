"""Defect 9: a kill between writing an image and committing its ArtifactWritten loses no
record. The resumed job finds the image on disk, skips rendering it, and records it then,
with the hash of the file that is there."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.home import Home

pytestmark = pytest.mark.slow

PROMPT = """\
[defaults]
steps = 2
width = 64
height = 64
seed = 3

[[image]]
prompt = "a red circle"
count = 3
"""


def test_defect9_a_kill_between_a_png_and_its_record_loses_no_record(home: Home) -> None:
    staged = home.staging("circles.toml")
    staged.write_text(PROMPT)
    home.drop(staged, "prompts")
    home.start(faults="kill@generate.written:2")  # right after the second PNG is written
    deadline = time.monotonic() + 120
    while home.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not home.alive(), home.log_text()[-3000:]
    home.kill()
    assert home.proc is not None and home.proc.returncode == -signal.SIGKILL
    job = next(j for j in home.jobs() if j["stage"] == "generate")
    folder = Path(job["spec"]["output_dir"])
    before = [e for e in home.events_of(job["id"]) if e["type"] == "ArtifactWritten"]
    assert len(before) == 1 and len(sorted(folder.glob("0*.png"))) == 2  # the kill's window

    home.start()
    home.wait_serving()
    jobs = home.wait_all_done(1, 120)
    assert home.terminate() == 0
    assert [j["state"] for j in jobs] == ["succeeded"]
    assert jobs[0]["result"]["rendered"] == 1 and jobs[0]["result"]["skipped"] == 2
    images = sorted(folder.glob("0*.png"))
    assert len(images) == 3
    recorded = [
        e["data"]
        for e in home.events_of(job["id"])
        if e["type"] == "ArtifactWritten" and e["data"]["kind"] == "image"
    ]
    assert sorted(r["path"] for r in recorded) == [str(p) for p in images]  # once each
    for record in recorded:
        content = Path(record["path"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(content).hexdigest()
        assert record["bytes"] == len(content)
    check = home.cli("store", "check")
    assert check.returncode == 0, check.stdout + check.stderr
