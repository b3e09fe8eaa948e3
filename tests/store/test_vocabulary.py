"""The vocabulary is the strings already stored in users' databases, importable alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dropkiln.store.vocabulary as vocabulary
from dropkiln.store.vocabulary import DropKind, DropState, JobState, Lane


def test_members_are_the_stored_strings() -> None:
    # Rows written before the enums existed hold these exact strings; they must still match.
    assert [s.value for s in JobState] == [
        "queued",
        "waiting",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert {lane.value for lane in Lane} == {"gpu", "cpu"}
    assert {kind.value for kind in DropKind} == {"dataset", "prompts"}
    assert {state.value for state in DropState} == {"ingested", "failed", "duplicate"}
    assert JobState("failed") is JobState.FAILED
    assert f"{JobState.RUNNING}" == "running"


def test_terminal_states() -> None:
    assert {s for s in JobState if s.terminal} == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
    }


def test_the_module_imports_only_the_standard_library() -> None:
    # Loaded by path so the package __init__ (which speaks SQL) does not run first.
    source = Path(vocabulary.__file__)
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('vocabulary', {str(source)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "heavy = {'sqlalchemy', 'torch', 'pydantic', 'dropkiln'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
