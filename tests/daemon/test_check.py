"""`dropkiln check FILE` refuses what a running daemon refuses, with the daemon's reason."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio.to_thread
import pytest

from dropkiln.cli import main
from dropkiln.config import Settings
from tests.daemon.harness import running_daemon
from tests.daemon.test_ingest import SMALL, wait_drops
from tests.samples import write_dataset

GOOD = '[defaults]\nsteps = 2\nwidth = 64\nheight = 64\n[[image]]\nprompts = ["a", "b"]\n'
BAD_PROMPTS = {
    "typo.toml": GOOD + "stpes = 3\n",
    "nolora.toml": 'loras = ["ghost"]\n' + GOOD,
    "vary.toml": GOOD + "vary = { sed = [1, 2] }\n",
}


async def check(
    capsys: pytest.CaptureFixture[str], settings: Settings, path: Path
) -> tuple[int, str]:
    argv = ["check", str(path), "--root", str(settings.root)]
    code = await anyio.to_thread.run_sync(functools.partial(main, argv))
    out, err = capsys.readouterr()
    return code, (out + err).strip()


@pytest.mark.slow
async def test_check_gives_the_reason_the_daemon_records_and_drops_nothing(
    settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    outside = tmp_path / "mine"
    outside.mkdir()
    for name, text in BAD_PROMPTS.items():
        (outside / name).write_text(text)
    (outside / "good.toml").write_text(GOOD)
    write_dataset(outside / "broken", toml=SMALL + "learning_rat = 0.1\n")
    write_dataset(outside / "cats", toml=SMALL)

    async with running_daemon(settings) as daemon:
        messages = {}
        for name in [*BAD_PROMPTS, "broken"]:
            code, message = await check(capsys, settings, outside / name)
            assert code == 1, message
            assert len(message.splitlines()) == 1
            messages[Path(name).stem] = message
        for name in ("good.toml", "cats"):
            code, message = await check(capsys, settings, outside / name)
            assert (code, message.split(":")[0]) == (0, "ok"), message
        # checking neither moved, copied nor recorded anything
        assert sorted(p.name for p in outside.iterdir()) == sorted(
            [*BAD_PROMPTS, "good.toml", "broken", "cats"]
        )
        assert await wait_drops(daemon.store, 0) == []

        for name, text in BAD_PROMPTS.items():
            (settings.paths.prompts / name).write_text(text)
        write_dataset(settings.root / "staging" / "broken", toml=SMALL + "learning_rat = 0.1\n")
        (settings.root / "staging" / "broken").rename(settings.paths.datasets / "broken")
        drops = {d["name"]: d for d in await wait_drops(daemon.store, len(messages))}
    for name, message in messages.items():
        assert drops[name]["state"] == "failed"
        # a dataset's reason names its dataset.toml, wherever the folder was checked
        reason = str(drops[name]["reason"]).replace(str(settings.paths.datasets), str(outside))
        assert reason.splitlines()[0] in message, (name, message, reason)
