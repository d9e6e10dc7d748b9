"""Paths a user cannot reach: one line naming the problem and the documented exit status, never a traceback.

The commands run as a real unprivileged user (made with useradd, as in test_privileges.py)
over a directory only root may enter, holding a queue, a spool, a Maildir, a password file
and the rest; the user's own queue sits beside it.
"""

import json
import os

import pytest
from conftest import SqliteHarness, fossil_message, run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a user and a directory it cannot enter")

C, J = "{closed}", "{jail}"  # filled in with the closed directory and the user's own

CASES = {
    "drain-db": (["--drain", "--db", f"{C}/emailqueue.db"], 66),
    "drain-spool": (["--drain", "--spool", f"{C}/spool"], 66),
    "drain-glob": (["--drain", "--db", f"{C}/*.db"], 66),
    "drain-state-dir": (["--drain", "--spool", f"{J}/spool", "--state-dir", f"{C}/state"], 66),
    "drain-config": (["--drain", "--config", f"{C}/mailrelayd.toml"], 78),
    "drain-log-file": (["--drain", "--db", f"{J}/emailqueue.db", "--log-file", f"{C}/log"], 73),
    "drain-password-file": (["--drain", "--db", f"{J}/emailqueue.db", "--smtp-server", "localhost", "--smtp-user",
                             "bob", "--smtp-password-file", f"{C}/password"], 78),
    "drain-ca-file": (["--drain", "--db", f"{J}/emailqueue.db", "--smtp-server", "localhost", "--smtp-ca-file",
                       f"{C}/ca.pem"], 78),
    "daemon-pidfile": (["--db", f"{J}/emailqueue.db", "--pidfile", f"{C}/pid"], 73),
    "status": (["status", "--db", f"{C}/emailqueue.db"], 66),
    "status-glob": (["status", "--spool", f"{C}/*"], 66),
    "list": (["list", "--spool", f"{C}/spool"], 66),
    "show": (["show", "1", "--db", f"{C}/emailqueue.db"], 66),
    "retry": (["retry", "--all", "--db", f"{C}/emailqueue.db"], 66),
    "purge": (["purge", "--failed", "--spool", f"{C}/spool"], 66),
    "test-message": (["test-message", "bob@example.com", "--db", f"{C}/emailqueue.db"], 66),
    "test-message-body": (["test-message", "bob@example.com", "--db", f"{J}/emailqueue.db", "--body", f"{C}/body"],
                          66),
    "check-config-maildir": (["check-config", "--db", f"{J}/emailqueue.db", "--maildir", f"{C}/Maildir"], 78),
    "check-config-spool": (["check-config", "--spool", f"{C}/spool"], 78),
    "check-config-state-dir": (["check-config", "--spool", f"{J}/spool", "--state-dir", f"{C}/state"], 78),
    "check-config-password-file": (["check-config", "--db", f"{J}/emailqueue.db", "--smtp-server", "localhost",
                                    "--smtp-user", "bob", "--smtp-password-file", f"{C}/password"], 78),
    "check-config-ca-file": (["check-config", "--db", f"{J}/emailqueue.db", "--smtp-server", "localhost",
                              "--smtp-ca-file", f"{C}/ca.pem"], 78),
    "check-config-command": (["check-config", "--db", f"{J}/emailqueue.db", "--command", f"{C}/sendmail"], 78),
    "check-config-glob": (["check-config", "--db", f"{C}/*.db"], 78),
    "check-config-config": (["check-config", "--config", f"{C}/mailrelayd.toml"], 78),
    "enqueue": (["enqueue", "-t", "--spool", f"{C}/spool"], 75),
}


@pytest.fixture
def closed(space, relay_user):
    """`space/closed`, only root may enter it, holding one of everything; the user's own queue and
    spool in `space/jail`."""
    closed = space / "closed"
    closed.mkdir(mode=0o700)
    SqliteHarness(closed / "emailqueue.db").enqueue(fossil_message())
    for name in ("spool", "state", "Maildir"):
        (closed / name).mkdir()
    for name, text in (("password", "secret\n"), ("ca.pem", ""), ("body", "hello\n"), ("mailrelayd.toml", ""),
                       ("sendmail", "#!/bin/sh\n")):
        (closed / name).write_text(text)
    (closed / "sendmail").chmod(0o755)
    SqliteHarness(space / "jail" / "emailqueue.db")
    (space / "jail" / "spool").mkdir()
    for path in space.joinpath("jail").rglob("*"):
        os.chown(path, relay_user.pw_uid, relay_user.pw_gid)
    return closed


@pytest.mark.parametrize("case", CASES)
def test_unreachable_path_is_one_line_and_its_exit_status(case, closed, space, relay_user, python):
    """Each command given a path the user cannot reach exits with its documented status, names the path on one
    line of stderr, and prints no traceback."""
    args, status = CASES[case]
    args = [a.format(closed=closed, jail=space / "jail") for a in args]
    if args[0] == "check-config" and not {"--command", "--config", "--maildir", "--smtp-server"} & set(args):
        args += ["--command", "/bin/true"]  # a sendmail that is there: the one problem is the path
    result = run_cli(*args, user=relay_user.pw_uid, group=relay_user.pw_gid, extra_groups=[], cwd="/",
                     python=python, add_allow_root=False, input="To: bob@example.com\n\nhello\n", timeout=30)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    named = [line for line in lines if str(closed) in line]
    assert len(named) == 1, result.stderr
    for line in lines:  # the line itself, or a drain's log lines (JSON)
        assert line.startswith(("mailrelayd: ", "mailrelayd-sendmail: ")) or json.loads(line), line
