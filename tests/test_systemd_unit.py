"""The files under systemd/: the unit verifies, its sandbox scores at most 2.0, the sysusers and
tmpfiles files apply, and the example config is valid Settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dropkiln.config import Settings

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD_DIR / "dropkiln.service"
API_UNIT = SYSTEMD_DIR / "dropkiln-api.service"
UNITS = pytest.mark.parametrize("unit", [UNIT, API_UNIT], ids=["daemon", "api"])
SYSUSERS = SYSTEMD_DIR / "dropkiln.sysusers"
TMPFILES = SYSTEMD_DIR / "dropkiln.tmpfiles"
EXAMPLE_CONFIG = SYSTEMD_DIR / "dropkiln.toml"

MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 is locked down, 10 is wide open

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """`Section.Key` -> every value assigned to it, in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    [value] = settings[key]
    return value


def environment(settings: dict[str, list[str]]) -> dict[str, str]:
    items = [item for value in settings["Service.Environment"] for item in value.split()]
    return dict(item.split("=", 1) for item in items)


def verify(unit: Path) -> list[str]:
    """What `systemd-analyze verify` says about this unit (it exits 0 even on bad keys)."""
    command = ["systemd-analyze", "verify", "--man=no"]
    help_text = subprocess.run(
        ["systemd-analyze", "--help"], capture_output=True, text=True, check=False
    ).stdout
    if "--recursive-errors" in help_text:
        # Judge this unit, not whatever the host's multi-user.target pulls in.
        command.append("--recursive-errors=no")
    done = subprocess.run([*command, str(unit)], capture_output=True, text=True, check=False)
    said = (done.stdout + done.stderr).splitlines()
    about_unit = [line for line in said if unit.name in line or str(unit) in line]
    if done.returncode != 0:
        about_unit.append(f"exit status {done.returncode}")
    return about_unit


def installable_copy(tmp_path: Path, extra_service_lines: str = "", unit: Path = UNIT) -> Path:
    """The unit with ExecStart pointing at a binary that exists here instead of /opt/dropkiln."""
    here = Path(sys.executable).with_name("dropkiln")
    binary = str(here) if os.access(here, os.X_OK) else shutil.which("true")
    assert binary is not None
    text = re.sub(
        r"^ExecStart=\S+", f"ExecStart={binary}", unit.read_text(), count=1, flags=re.MULTILINE
    )
    text = text.replace("\n[Install]", f"\n{extra_service_lines}[Install]")
    copy = tmp_path / unit.name
    copy.write_text(text)
    return copy


@needs_analyze
@UNITS
def test_unit_verifies_without_a_single_complaint(tmp_path: Path, unit: Path) -> None:
    assert verify(installable_copy(tmp_path, unit=unit)) == []


@needs_analyze
def test_verify_check_does_catch_a_bad_key(tmp_path: Path) -> None:
    complaints = verify(installable_copy(tmp_path, "Frobnicate=yes\nUMask=0999\n"))

    assert any("Frobnicate" in line for line in complaints), complaints
    assert any("0999" in line for line in complaints), complaints


@needs_analyze
@UNITS
def test_sandbox_exposure_is_at_most_two(unit: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert found is not None, done.stdout + done.stderr

    exposure = float(found[1])
    assert exposure <= MAX_EXPOSURE, done.stdout


def test_unit_keeps_the_daemon_contract() -> None:
    unit = unit_settings()
    env = environment(unit)

    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert one(unit, "Service.WatchdogSec") == "60"
    assert one(unit, "Service.Restart") == "on-failure"
    assert one(unit, "Service.KillMode") == "mixed"
    assert int(one(unit, "Service.TimeoutStopSec")) >= 120
    assert (one(unit, "Service.User"), one(unit, "Service.Group")) == ("dropkiln", "dropkiln")
    assert "Service.DynamicUser" not in unit

    root = "/var/lib/" + one(unit, "Service.StateDirectory")
    assert one(unit, "Service.ExecStart").endswith(f"dropkiln daemon --root {root}")
    assert env["DROPKILN_ROOT"] == root
    assert env["HF_HUB_OFFLINE"] == "1"


def test_unit_grants_the_gpu_and_nothing_on_the_network() -> None:
    unit = unit_settings()
    allowed = {value.split()[0] for value in unit["Service.DeviceAllow"]}

    assert one(unit, "Service.PrivateDevices") == "no"  # it would hide /dev/nvidia*
    assert one(unit, "Service.DevicePolicy") == "closed"
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm", "char-nvidia-uvm"} <= allowed
    assert one(unit, "Service.PrivateNetwork") == "yes"
    assert one(unit, "Service.IPAddressDeny") == "any"
    assert one(unit, "Service.RestrictAddressFamilies") == "AF_UNIX"  # the notify socket


def test_api_unit_serves_the_same_root_on_loopback_only() -> None:
    daemon, api = unit_settings(), unit_settings(API_UNIT)
    root = "/var/lib/" + one(daemon, "Service.StateDirectory")
    assert one(api, "Service.ExecStart").endswith(f"dropkiln serve --root {root}")
    assert "--public" not in one(api, "Service.ExecStart")
    assert environment(api)["DROPKILN_ROOT"] == root
    assert (one(api, "Service.User"), one(api, "Service.Group")) == ("dropkiln", "dropkiln")
    assert one(api, "Service.StateDirectory") == one(daemon, "Service.StateDirectory")
    # peers on loopback only (the local TLS proxy); no devices at all; no JIT
    assert one(api, "Service.IPAddressDeny") == "any"
    assert one(api, "Service.IPAddressAllow") == "localhost"
    assert one(api, "Service.PrivateDevices") == "yes"
    assert one(api, "Service.MemoryDenyWriteExecute") == "yes"
    assert "dropkiln.service" in one(api, "Unit.After").split()


def test_unit_environment_is_understood_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("DROPKILN_")]:
        monkeypatch.delenv(name)
    for name, value in environment(unit_settings()).items():
        monkeypatch.setenv(name, value)

    assert Settings.load().root == Path("/var/lib/dropkiln")


def test_example_config_is_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("DROPKILN_")]:
        monkeypatch.delenv(name)
    shutil.copy(EXAMPLE_CONFIG, tmp_path / "dropkiln.toml")

    settings = Settings.load(tmp_path)

    assert settings.device == "cuda"
    assert settings.settle_seconds == 5.0
    # A misspelt key would have been refused rather than ignored:
    (tmp_path / "dropkiln.toml").write_text("setle_seconds = 5\n")
    with pytest.raises(ValueError, match="setle_seconds"):
        Settings.load(tmp_path)


def apply_sysusers(root: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Run systemd-sysusers on the file into an empty root; return its passwd and group rows."""
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", "-"],
        input=SYSUSERS.read_text(),
        capture_output=True,
        text=True,
        check=True,
    )
    return database(root / "etc/passwd"), database(root / "etc/group")


def database(path: Path) -> dict[str, list[str]]:
    rows = [line.split(":") for line in path.read_text().splitlines()]
    return {row[0]: row for row in rows}


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_service_user_and_its_groups(tmp_path: Path) -> None:
    unit = unit_settings()
    passwd, group = apply_sysusers(tmp_path / "root")

    _, _, uid, gid, _, home, shell = passwd["dropkiln"]
    assert 0 < int(uid) < 1000, "a system user"
    assert group["dropkiln"][2] == gid
    assert home == "/var/lib/" + one(unit, "Service.StateDirectory")
    assert shell.endswith("nologin")
    for name in one(unit, "Service.SupplementaryGroups").split():
        assert "dropkiln" in group[name][3].split(","), name


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="no systemd-sysusers or systemd-tmpfiles",
)
def test_tmpfiles_creates_root_and_drop_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    passwd, _ = apply_sysusers(root)
    lines = TMPFILES.read_text()
    as_root = os.geteuid() == 0
    if not as_root:
        # Only root may chown: check syntax, paths and modes; ownership is checked as root.
        lines = re.sub(r"^(d\s+\S+\s+\d+)\s+dropkiln\s+dropkiln", r"\1 - -", lines, flags=re.M)

    done = subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", "-"],
        input=lines,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    state = root / "var/lib" / one(unit_settings(), "Service.StateDirectory")
    expected_modes = {
        state: 0o750,
        state / "drop": 0o750,
        state / "drop/datasets": 0o2770,
        state / "drop/prompts": 0o2770,
        root / "var/cache" / one(unit_settings(), "Service.CacheDirectory"): 0o750,
    }
    for path, mode in expected_modes.items():
        stat = path.stat()
        assert stat.st_mode & 0o7777 == mode, f"{path}: {oct(stat.st_mode & 0o7777)}"
        if as_root:
            assert stat.st_uid == int(passwd["dropkiln"][2]), path
            assert stat.st_gid == int(passwd["dropkiln"][3]), path


TEMPLATE = SYSTEMD_DIR / "dropkiln@.service"


@needs_analyze
def test_the_per_device_template_verifies_and_stays_sandboxed(tmp_path: Path) -> None:
    # Verified as an instance; offline, systemd-analyze misreads a ':' in a file name, so the
    # instance here is "cpu" (a real one is dropkiln@cuda:1.service).
    copy = installable_copy(tmp_path, unit=TEMPLATE)
    instance = copy.rename(tmp_path / "dropkiln@cpu.service")
    assert verify(instance) == []
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert found is not None and float(found[1]) <= MAX_EXPOSURE, done.stdout + done.stderr


def test_the_per_device_template_is_the_daemon_unit_with_a_device() -> None:
    single, template = unit_settings(), unit_settings(TEMPLATE)
    exec_start = one(template, "Service.ExecStart")
    assert exec_start == one(single, "Service.ExecStart") + " --device %i"
    assert one(template, "Unit.Conflicts") == "dropkiln.service"
    differ = {"Unit.Description", "Unit.Conflicts", "Service.ExecStart"}
    assert {k: v for k, v in template.items() if k not in differ} == {
        k: v for k, v in single.items() if k not in differ
    }
