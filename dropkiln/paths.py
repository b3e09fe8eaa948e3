"""The folder layout under ROOT, and which ROOT. Standard library only: the CLI's read
commands find the database from here without loading the settings (pydantic-settings)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

DEFAULT_ROOT = Path("dropkiln-home")
CONFIG_NAME = "dropkiln.toml"


def root_from(flag: Path | str | None) -> Path:
    """ROOT as the settings resolve it: the flag, else $DROPKILN_ROOT, else ./dropkiln-home."""
    return Path(flag or os.environ.get("DROPKILN_ROOT") or DEFAULT_ROOT).expanduser()


class Paths:
    """The folder layout under ROOT (see README: 'Folders')."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / CONFIG_NAME
        self.drop = root / "drop"
        self.datasets = self.drop / "datasets"
        self.prompts = self.drop / "prompts"
        self.processed = self.drop / "processed"
        self.failed = self.drop / "failed"
        self.outputs = root / "outputs"
        self.loras = self.outputs / "loras"
        self.images = self.outputs / "images"
        self.videos = self.outputs / "videos"
        self.bench = self.outputs / "bench"
        self.state = root / "state"
        self.db = self.state / "dropkiln.db"
        self.cache = self.state / "cache"
        self.checkpoints = self.state / "checkpoints"
        self.models = self.state / "models"
        self.work = self.state / "work"
        self.lock = self.state / "daemon.lock"
        self.api_token = self.state / "api-token"

    @property
    def store_url(self) -> str:
        """``store_url`` as the settings resolve it ($DROPKILN_STORE_URL, else dropkiln.toml),
        read without them; "" is the SQLite file ``db``."""
        if "DROPKILN_STORE_URL" in os.environ:
            return os.environ["DROPKILN_STORE_URL"]
        try:
            with open(self.config, "rb") as handle:
                value = tomllib.load(handle).get("store_url", "")
        except (OSError, tomllib.TOMLDecodeError):
            return ""  # the settings, loaded by whatever needs them, report a broken file
        return str(value)

    def folders(self) -> list[Path]:
        return [
            self.datasets,
            self.prompts,
            self.processed,
            self.failed,
            self.loras,
            self.images,
            self.videos,
            self.cache,
            self.checkpoints,
            self.models,
            self.work,
        ]

    def create(self) -> None:
        for folder in self.folders():
            folder.mkdir(parents=True, exist_ok=True)
