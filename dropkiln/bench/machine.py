"""What a result was measured on, so that two reports can be compared fairly."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from dropkiln import __version__

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy")


def machine_info(device: str, dtype: str | None = None) -> dict[str, Any]:
    """CPU, RAM, GPU, library versions, dropkiln version and commit, date."""
    memory = psutil.virtual_memory()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_gb": round(memory.total / 2**30, 1),
        "gpu": gpu_name(),
        "device": device,
        "dtype": dtype,
        "torch_threads": _torch_threads(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "versions": {name: _version(name) for name in LIBRARIES},
        "dropkiln": __version__,
        "git_commit": git_commit(),
    }


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first CUDA device's name, or None. Asks torch only if it is already imported."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        listed = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    names = listed.stdout.strip().splitlines()
    return names[0].strip() if names else None


def git_commit() -> str | None:
    """The commit of the dropkiln checkout in use, with ``-dirty`` for local changes."""
    source = Path(__file__).resolve().parents[2]
    git = shutil.which("git")
    if git is None or not (source / ".git").exists():
        return None
    try:
        head = subprocess.run(
            [git, "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            [git, "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if changed else head


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
