"""The import-linter contracts in pyproject.toml (run by `lint-imports`) cover the package."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path
from typing import Any

import dropkiln

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads(PYPROJECT.read_text())
    found: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return found


def test_the_driver_contract_names_every_module_but_the_store() -> None:
    # A forbidden contract lists its sources; a new top-level module left off the list
    # could import sqlite3 unnoticed.
    driver = next(c for c in contracts() if "sqlite3" in c["forbidden_modules"])
    modules = {f"dropkiln.{module.name}" for module in pkgutil.iter_modules(dropkiln.__path__)}
    assert set(driver["source_modules"]) == modules - {"dropkiln.store"}
    assert {"sqlalchemy", "aiosqlite"} <= set(driver["forbidden_modules"])
