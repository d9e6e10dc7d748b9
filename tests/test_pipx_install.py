"""The README's generic install: pipx puts the commands in /usr/local/bin, where the units find them.

Like tests/test_package.py, it changes the machine (/opt/pipx, /usr/local/bin), so it runs
only as root with MAILRELAYD_TEST_INSTALL=1 (tests/install-and-run.sh sets it), refuses a
machine that already has mailrelayd there, and uninstalls even when a test fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT
from test_package import delivered, example_queue, run
from test_units import MAIN, verify

PIPX = {"PIPX_HOME": "/opt/pipx", "PIPX_BIN_DIR": "/usr/local/bin"}
COMMANDS = [Path("/usr/local/bin/mailrelayd"), Path("/usr/local/bin/mailrelayd-sendmail")]
VENV = Path("/opt/pipx/venvs/mailrelayd")
# Where systemd looks for an ExecStart= program named without a directory, in its order.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"


def pipx(*args: str) -> None:
    """Debian's pipx, run as the README says, with Debian's python3 first on PATH."""
    run("pipx", *args, env={**PIPX, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd=ROOT)


@pytest.fixture(scope="module")
def installed():
    """mailrelayd installed from this tree by `PIPX_HOME=/opt/pipx PIPX_BIN_DIR=/usr/local/bin pipx install .`."""
    if os.environ.get("MAILRELAYD_TEST_INSTALL") != "1" or os.geteuid() != 0:
        pytest.skip("installs mailrelayd with pipx on this machine: run as root with MAILRELAYD_TEST_INSTALL=1"
                    " (sh tests/install-and-run.sh does)")
    if shutil.which("pipx", path="/usr/bin") is None:
        pytest.fail("pipx is missing (apt-get install pipx)")
    if VENV.exists() or any(os.path.lexists(c) for c in COMMANDS):
        pytest.fail("mailrelayd is already installed with pipx here: refusing to replace and then remove it")
    home_is_ours = not Path(PIPX["PIPX_HOME"]).exists()
    try:
        pipx("install", ".")
        yield
    finally:
        if VENV.exists():
            pipx("uninstall", "mailrelayd")
        if home_is_ours:  # pipx's shared files stay after an uninstall
            shutil.rmtree(PIPX["PIPX_HOME"])


def test_commands_land_where_the_units_look(installed):
    """Both commands are in /usr/local/bin, the first directory systemd searches for ExecStart=mailrelayd."""
    for command in COMMANDS:
        assert shutil.which(command.name, path=SYSTEMD_PATH) == str(command)


def test_another_user_drains_the_example_queue(installed):
    """The pipx install is usable by every user: nobody drains the example queue into a Maildir."""
    queue = example_queue(owner="nobody")
    try:
        run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(COMMANDS[0]), "--drain",
            "--db", str(queue), "--maildir", str(queue.parent / "maildir"))
        assert len(delivered(queue.parent / "maildir")) == 4
    finally:
        shutil.rmtree(queue.parent)


def test_repository_unit_verifies_as_it_is(installed):
    """systemd-analyze verify accepts systemd/mailrelayd.service unchanged: its ExecStart finds the pipx command."""
    verify(MAIN)


def test_uninstall_removes_it(installed):
    """`pipx uninstall mailrelayd` with the same variables removes the commands and the virtualenv."""
    pipx("uninstall", "mailrelayd")
    assert not VENV.exists() and not any(os.path.lexists(c) for c in COMMANDS)
