"""The undisturbed reference runs, made once per session and per config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.home import CONFIG, Home
from tests.reliability.pipeline import (
    Outputs,
    assert_outputs_whole,
    collect_outputs,
    run_undisturbed,
)

Reference = Callable[[str], Outputs]


@pytest.fixture(scope="session")
def reference_outputs(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """outputs of an undisturbed pipeline run with ``config`` (run on first use, then kept)."""
    made: dict[str, Outputs] = {}

    def reference(config: str = CONFIG) -> Outputs:
        if config not in made:
            home = Home(tmp_path_factory.mktemp("reference") / "home", config)
            jobs = run_undisturbed(home)
            assert [j["state"] for j in jobs] == ["succeeded"] * len(jobs), jobs
            assert_outputs_whole(home.root, jobs)
            made[config] = collect_outputs(home.root)
        return made[config]

    return reference


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    """A fresh home; its daemon is stopped when the test ends, however it ends."""
    made = Home(tmp_path / "home")
    yield made
    made.stop()
