"""The systemd unit files: checked by `systemd-analyze verify` and for the notify settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
MAIN = UNITS / "mailrelayd.service"
TEMPLATE = UNITS / "mailrelayd@.service"
EXEC_START = "ExecStart=/usr/local/bin/mailrelayd "


def systemd_analyze() -> str:
    """The systemd-analyze program; skipped without it, except under CI."""
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (install the Debian package systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


def copy_unit(unit: Path, directory: Path, uncomment: bool = False) -> Path:
    """Copy `unit` into `directory` with ExecStart pointing at a program that exists here,
    since verify checks that; with `uncomment`, turn the commented-out directives on."""
    program = shutil.which("mailrelayd", path=os.path.dirname(sys.executable)) or "/bin/true"
    text = unit.read_text()
    assert EXEC_START in text
    text = text.replace(EXEC_START, f"ExecStart={program} ")
    if uncomment:
        text = re.sub(r"(?m)^#([A-Z][A-Za-z]+=)", r"\1", text)
    copy = directory / unit.name
    copy.write_text(text)
    return copy


def verify(path: Path) -> None:
    """Run systemd-analyze verify on `path`; fail on a non-zero exit or any line about our units."""
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0")
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", str(path)],
                            capture_output=True, text=True, env=env, timeout=60)
    output = result.stdout + result.stderr
    about_us = [line for line in output.splitlines() if "mailrelayd" in line]
    assert result.returncode == 0 and not about_us, output


def test_main_unit_verifies(tmp_path):
    """systemd-analyze accepts mailrelayd.service without a warning."""
    verify(copy_unit(MAIN, tmp_path))


def test_template_instance_verifies(tmp_path):
    """systemd-analyze accepts an instance of mailrelayd@.service without a warning."""
    copy_unit(TEMPLATE, tmp_path)
    verify(tmp_path / "mailrelayd@example.service")


@pytest.mark.parametrize("unit", [MAIN, TEMPLATE], ids=["main", "template"])
def test_optional_hardening_verifies(tmp_path, unit):
    """The commented-out hardening for set-ups without setgid postdrop is valid when turned on."""
    copy_unit(unit, tmp_path, uncomment=True)
    verify(tmp_path / unit.name.replace("@.", "@example."))


def test_verify_reports_a_bad_directive(tmp_path):
    """The check itself works: a misspelt directive in the template makes it fail."""
    copy = copy_unit(TEMPLATE, tmp_path)
    copy.write_text(copy.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    with pytest.raises(AssertionError, match="Unknown key"):
        verify(tmp_path / "mailrelayd@example.service")


@pytest.mark.parametrize("unit", [MAIN, TEMPLATE], ids=["main", "template"])
def test_units_use_notify_and_watchdog(unit):
    """Both units are Type=notify with a watchdog, and kill only the main process on stop."""
    lines = unit.read_text().splitlines()
    assert "Type=notify" in lines
    assert "NotifyAccess=main" in lines
    assert any(line.startswith("WatchdogSec=") for line in lines)
    assert "KillMode=mixed" in lines


def test_template_config_follows_instance():
    """The template's ExecStart reads the configuration file named by the instance."""
    lines = TEMPLATE.read_text().splitlines()
    assert "ExecStart=/usr/local/bin/mailrelayd --config /etc/mailrelayd/%i.toml" in lines


def test_postfix_setgid_is_not_blocked():
    """No active directive implies NoNewPrivileges=yes, which would stop Postfix's setgid postdrop."""
    implying = {"NoNewPrivileges", "DynamicUser", "LockPersonality", "MemoryDenyWriteExecute", "PrivateDevices",
                "ProtectClock", "ProtectHostname", "ProtectKernelLogs", "ProtectKernelModules",
                "ProtectKernelTunables", "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
                "RestrictSUIDSGID", "SystemCallArchitectures", "SystemCallFilter", "SystemCallLog"}
    for unit in (MAIN, TEMPLATE):
        active = dict(line.split("=", 1) for line in unit.read_text().splitlines() if re.match(r"[A-Z]\w*=", line))
        assert active.get("NoNewPrivileges") == "no"
        assert not (implying - {"NoNewPrivileges"}) & active.keys(), unit.name
