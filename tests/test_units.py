"""The systemd unit files: checked by `systemd-analyze verify`, rated by `systemd-analyze security`,
and Postfix's sendmail run as they run it (no new privileges, only the group postdrop)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until
from mta import postfix_instance, smtp_sink  # noqa: F401 (fixtures)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
MAIN = UNITS / "mailrelayd.service"
TEMPLATE = UNITS / "mailrelayd@.service"
EXEC_START = "ExecStart=mailrelayd "
BEST_EXPOSURE = 2.0  # systemd-analyze security: 0 is best, 10 worst; 2.0 or less reads "OK"


def systemd_analyze() -> str:
    """The systemd-analyze program; skipped without it, except under CI."""
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (install the Debian package systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


def copy_unit(unit: Path, directory: Path) -> Path:
    """Copy `unit` into `directory` with ExecStart pointing at a program that exists here,
    since verify checks that."""
    program = shutil.which("mailrelayd", path=os.path.dirname(sys.executable)) or "/bin/true"
    text = unit.read_text()
    assert EXEC_START in text
    text = text.replace(EXEC_START, f"ExecStart={program} ")
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
    assert "ExecStart=mailrelayd --config /etc/mailrelayd/%i.toml" in lines


def exposure(unit: Path, directory: Path) -> float:
    """The overall exposure level `systemd-analyze security --offline=true` gives the unit."""
    copy_unit(unit, directory)
    name = unit.name.replace("@.", "@example.")
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", name],
                            capture_output=True, text=True, cwd=directory, timeout=60,
                            env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found[1])


@pytest.mark.parametrize("unit", [MAIN, TEMPLATE], ids=["main", "template"])
def test_units_are_rated_ok(tmp_path, unit):
    """systemd-analyze security rates both units 2.0 or better (it rated them 6.0 MEDIUM with setgid postdrop)."""
    assert exposure(unit, tmp_path) <= BEST_EXPOSURE


def hardening(unit: Path) -> list[str]:
    """The unit's lines from its hardening comment on: the sandbox and [Install]."""
    text = unit.read_text()
    return text[text.index("# Hardening"):].splitlines()


def test_units_share_one_hardening():
    """The template runs in exactly the sandbox of the main unit."""
    assert hardening(MAIN) == hardening(TEMPLATE)


def test_no_new_privileges():
    """Neither unit lets a program gain privileges: no setuid or setgid program works under them."""
    for unit in (MAIN, TEMPLATE):
        assert "NoNewPrivileges=yes" in hardening(unit), unit.name


# -- Postfix's sendmail as the units run it ------------------------------------------------


def run_as_the_units_do(groups: list[str], *command: str) -> list[str]:
    """`command` as an unprivileged user (nobody) that can gain no privileges, with no
    capabilities and the given supplementary groups: what the units give mailrelayd."""
    return ["setpriv", "--no-new-privs", "--reuid=nobody", "--regid=nogroup", "--bounding-set=-all",
            *(["--groups=" + ",".join(groups)] if groups else ["--clear-groups"]), *command]


MESSAGE = b"To: bob@example.com\nFrom: noreply@example.org\nSubject: no setgid\n\nDelivered.\n"


def postfix_sendmail(postfix_instance, groups: list[str], stderr) -> subprocess.Popen:
    """Postfix's /usr/sbin/sendmail -ti for the private instance, as the units run it.
    MAIL_CONFIG names the instance: a process that is not set-id may choose its Postfix."""
    env = dict(os.environ, MAIL_CONFIG=str(postfix_instance.config_dir))
    proc = subprocess.Popen(run_as_the_units_do(groups, "/usr/sbin/sendmail", "-ti"), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
    proc.stdin.write(MESSAGE)
    proc.stdin.close()
    return proc


@pytest.mark.mta
def test_postfix_sendmail_works_with_only_the_postdrop_group(postfix_instance, smtp_sink, tmp_path):
    """A user in the group postdrop, with no new privileges (setgid ignored), queues mail through Postfix."""
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = postfix_sendmail(postfix_instance, ["postdrop"], stderr)
        assert proc.wait(timeout=60) == 0, (tmp_path / "stderr").read_text()
    received = wait_until(smtp_sink.received, timeout=60, what="Postfix to relay the message")
    assert received[0].data.endswith(b"Delivered.\r\n")


@pytest.mark.mta
def test_postfix_sendmail_fails_without_the_postdrop_group(postfix_instance, tmp_path):
    """Without the group, the same user's postdrop may not write the maildrop: the group is what grants it."""
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:
        proc = postfix_sendmail(postfix_instance, [], stderr)
    try:  # postdrop retries for ever; its first warning is the answer
        wait_until(lambda: "Permission denied" in log.read_text(), timeout=60, what="postdrop to be refused")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert postfix_instance.queue_empty()
