"""The undisturbed reference runs, made once per session and per config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.home import Home
from tests.reliability.pipeline import (
    STANDARD,
    Outputs,
    Pipeline,
    assert_outputs_whole,
    collect_outputs,
    run_undisturbed,
)
from tests.storecheck import store_checked_after

Reference = Callable[..., Outputs]

__all__ = ["store_checked_after"]  # every test ends with `store check`


@pytest.fixture(scope="session")
def reference_outputs(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The outputs of an undisturbed run of ``pipeline`` (run on first use, then kept)."""
    made: dict[Pipeline, Outputs] = {}

    def reference(pipeline: Pipeline = STANDARD) -> Outputs:
        if pipeline not in made:
            home = pipeline.home(tmp_path_factory.mktemp("reference") / "home")
            jobs = run_undisturbed(home, pipeline)
            assert [j["state"] for j in jobs] == ["succeeded"] * len(jobs), jobs
            assert_outputs_whole(home.root, jobs, pipeline)
            made[pipeline] = collect_outputs(home.root)
        return made[pipeline]

    return reference


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    """A fresh home; its daemon is stopped when the test ends, however it ends."""
    made = Home(tmp_path / "home")
    yield made
    made.stop()
