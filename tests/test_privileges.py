"""Privileges: started as root, the relay switches to `user` before it touches a queue, or refuses.

These tests start mailrelayd as root (CI runs the suite as root) with a real unprivileged
user made for the session (useradd), which has a supplementary group, and check what the
kernel says of the relay and of its sendmail children (/proc/PID/status).
"""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import FakeSendmail, SpoolHarness, SqliteHarness, fossil_message, run_cli, tree, wait_until

from mailrelayd.message import to_lf

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching from root is only tried as root (CI is root)")


@pytest.fixture
def sendmail(space, relay_user) -> FakeSendmail:
    """The fake sendmail, where the user can run it, recording who each run was."""
    fake = FakeSendmail(space / "fake-sendmail")
    os.chown(fake.ctl / "calls", relay_user.pw_uid, relay_user.pw_gid)
    fake.record_ids()
    return fake


def _harness(kind: str, space: Path, user):
    harness = SqliteHarness(space / "jail" / "emailqueue.db") if kind == "sqlite" else SpoolHarness(space / "jail")
    os.chown(harness.path, user.pw_uid, user.pw_gid)
    return harness


def _the_user(user) -> dict[str, list[str]]:
    """How /proc/PID/status shows a process running as `user` and its groups."""
    groups = sorted(str(g) for g in os.getgrouplist(user.pw_name, user.pw_gid))
    return {"Uid": [str(user.pw_uid)] * 4, "Gid": [str(user.pw_gid)] * 4, "Groups": groups}


def _ids(pid: int) -> dict[str, list[str]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    found = {key: rest.split() for key, _, rest in (line.partition(":") for line in lines)}
    return {key: sorted(found[key]) if key == "Groups" else found[key] for key in ("Uid", "Gid", "Groups")}


def _owners(directory: Path) -> dict[str, int]:
    """The owner of everything under `directory`, by path."""
    return {str(p.relative_to(directory)): p.lstat().st_uid for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("kind", ["sqlite", "spool"])
def test_drain_started_as_root_relays_as_user(kind, space, sendmail, relay_user, python):
    """A drain started as root with --user delivers through a sendmail running as that user and its groups, and
    everything it leaves beside the queue belongs to the user."""
    harness = _harness(kind, space, relay_user)
    data = fossil_message()
    harness.enqueue(data)
    result = run_cli("--drain", *harness.cli_args, "--settle", "0", "--user", relay_user.pw_name,
                     "--command", f"{sendmail.path} -ti", python=python)
    assert result.returncode == 0, result.stderr
    assert sendmail.bodies() == [to_lf(data)]
    [ids] = sendmail.ids()
    assert {**ids, "Groups": sorted(ids["Groups"])} == {**_the_user(relay_user), "Home": ["/nonexistent"]}
    assert set(_owners(space / "jail").values()) == {relay_user.pw_uid}, _owners(space / "jail")


def test_detached_daemon_runs_as_user(space, sendmail, relay_user, python):
    """--daemon --user: the pidfile, opened as root where only root may write, names a process running as the user
    and its groups; the queue's lock file and the log file belong to the user; its sendmail is the user too."""
    harness = _harness("sqlite", space, relay_user)
    pidfile, log = space / "run" / "mailrelayd.pid", space / "run" / "mailrelayd.log"
    started = run_cli("--daemon", *harness.cli_args, "--user", str(relay_user.pw_uid), "--pidfile", str(pidfile),
                      "--log-file", str(log), "--command", f"{sendmail.path} -ti", timeout=30, python=python)
    assert started.returncode == 0, started.stderr
    pid = int(wait_until(lambda: pidfile.read_text().strip(), timeout=10, what="the pidfile"))
    try:
        assert _ids(pid) == _the_user(relay_user)
        lock = harness.path.with_name("emailqueue.db.mailrelayd.lock")
        assert lock.stat().st_uid == relay_user.pw_uid and log.stat().st_uid == relay_user.pw_uid
        data = fossil_message(subject="from the user's daemon")
        harness.enqueue(data)
        wait_until(lambda: sendmail.bodies() == [to_lf(data)], timeout=10, what="the delivery")
        [ids] = sendmail.ids()
        assert ids["Uid"] == [str(relay_user.pw_uid)] * 4
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: _gone(pid), timeout=15, what="the daemon to exit")
    assert pidfile.read_text() == ""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.parametrize("kind", ["sqlite", "spool"])
@pytest.mark.parametrize("mode", [["--drain"], [], ["--daemon"]], ids=["drain", "daemon", "detached"])
def test_root_without_user_is_refused_and_touches_nothing(kind, mode, space, sendmail, relay_user):
    """Started as root without user or allow_root, mailrelayd exits 78 with one line naming both settings, and
    creates nothing: no lock file, no WAL, no state directory, no log file or pidfile."""
    harness = _harness(kind, space, relay_user)
    harness.enqueue(fossil_message())
    before = tree(space)
    extra = [] if mode == ["--drain"] else ["--pidfile", str(space / "run" / "pid")]
    result = run_cli(*mode, *harness.cli_args, *extra, "--log-file", str(space / "run" / "log"),
                     "--command", f"{sendmail.path} -ti", add_allow_root=False)
    assert result.returncode == 78
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert "--user" in result.stderr and "--allow-root" in result.stderr
    assert tree(space) == before


def test_allow_root_relays_as_root_with_a_warning(space, sendmail, relay_user):
    """--allow-root, started as root: the relay logs running_as_root before relaying, and its sendmail runs as root."""
    harness = _harness("sqlite", space, relay_user)
    harness.enqueue(fossil_message())
    result = run_cli("--drain", *harness.cli_args, "--allow-root", "--log-format", "json",
                     "--command", f"{sendmail.path} -ti", add_allow_root=False)
    assert result.returncode == 0, result.stderr
    events = [(e["event"], e["level"]) for e in map(json.loads, result.stderr.splitlines())]
    assert events.index(("running_as_root", "warning")) < events.index(("message_sent", "info"))
    [ids] = sendmail.ids()
    assert ids["Uid"] == ["0"] * 4


@pytest.mark.parametrize("user", ["root", "0"])
def test_user_root_is_refused(user, space, sendmail, relay_user):
    """user = root (by name or uid) is refused with one line pointing to allow_root, exit 78."""
    harness = _harness("sqlite", space, relay_user)
    config = space / "mailrelayd.toml"
    config.write_text(f'user = "{user}"\n')
    result = run_cli("--drain", "--config", str(config), *harness.cli_args, "--command", f"{sendmail.path} -ti",
                     add_allow_root=False)
    assert result.returncode == 78
    assert len(result.stderr.splitlines()) == 1 and "allow_root" in result.stderr, result.stderr
    assert sendmail.calls() == []


def test_unknown_user_is_one_line(space, sendmail, relay_user):
    """A --user that does not exist is one line naming it, exit 78."""
    harness = _harness("sqlite", space, relay_user)
    result = run_cli("--drain", *harness.cli_args, "--user", "no-such-user-here", add_allow_root=False)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "mailrelayd: bad value for --user ('no-such-user-here'): expected a user name or uid that exists on this host"]


def test_user_in_a_queue_table_is_refused(space, relay_user):
    """user applies to the whole process: a [[queue]] table cannot set it."""
    config = space / "mailrelayd.toml"
    config.write_text(f'[[queue]]\ndb = "{space}/jail/emailqueue.db"\nuser = "{relay_user.pw_name}"\n')
    result = run_cli("--drain", "--config", str(config), add_allow_root=False)
    assert result.returncode == 78
    assert "user applies to the whole process" in result.stderr


@pytest.mark.parametrize("command", [["retry", "--all"], ["purge", "--failed"],
                                     ["test-message", "bob@example.com"]])
def test_admin_commands_that_write_follow_the_relays_rule(command, space, relay_user):
    """retry, purge and test-message run as root without user or allow_root are refused (78, one line),
    changing nothing."""
    harness = _harness("sqlite", space, relay_user)
    before = tree(space)
    result = run_cli(*command, *harness.cli_args, add_allow_root=False)
    assert result.returncode == 78
    assert len(result.stderr.splitlines()) == 1 and "--allow-root" in result.stderr, result.stderr
    assert tree(space) == before


@pytest.mark.parametrize("command", [["status"], ["list"], ["show", "1"]])
def test_admin_commands_that_read_run_as_root(command, space, relay_user):
    """status, list and show run as root without user or allow_root."""
    harness = _harness("sqlite", space, relay_user)
    harness.enqueue(fossil_message())
    result = run_cli(*command, *harness.cli_args, add_allow_root=False)
    assert result.returncode == 0, result.stderr
    assert "bob@example.com" in result.stdout or "queued         1" in result.stdout


def test_admin_command_with_user_reads_as_user(space, relay_user, python):
    """`list --user U` as root reads as U: a spool only root may enter is refused (66, one line) with --user U,
    while root alone lists it; neither creates anything (they only read: see test_monitoring.py)."""
    harness = SpoolHarness(space / "run")
    harness.path.chmod(0o700)
    harness.enqueue(fossil_message())
    before = tree(space)
    as_user = run_cli("list", *harness.cli_args, "--user", relay_user.pw_name, python=python)
    assert as_user.returncode == 66, as_user.stderr
    assert as_user.stderr.splitlines() == [f"mailrelayd: {harness.path}: Permission denied"]
    as_root = run_cli("list", *harness.cli_args, add_allow_root=False)
    assert as_root.returncode == 0 and "bob@example.com" in as_root.stdout, as_root.stderr
    assert tree(space) == before


def test_test_message_with_user_queues_as_user(space, relay_user, python):
    """test-message --user U as root writes its spool file as U."""
    harness = _harness("spool", space, relay_user)
    result = run_cli("test-message", "bob@example.com", *harness.cli_args, "--user", relay_user.pw_name,
                     python=python)
    assert result.returncode == 0, result.stderr
    assert [p.stat().st_uid for p in harness.path.iterdir()] == [relay_user.pw_uid]


def test_check_config_as_root_checks_as_user(space, sendmail, relay_user, python):
    """check-config --user U run as root makes its checks as U: a queue only root may write is a problem."""
    db = space / "run" / "emailqueue.db"  # root's directory and file
    SqliteHarness(db)
    result = run_cli("check-config", "--db", str(db), "--user", relay_user.pw_name,
                     "--command", f"{sendmail.path} -ti", python=python)
    assert result.returncode == 78
    assert f"# checked as user {relay_user.pw_name}" in result.stdout
    assert result.stderr.splitlines() == [f"mailrelayd: queue directory {db.parent}: not writable by this user"]


def test_check_config_as_root_without_user_is_a_problem(space, sendmail, relay_user):
    """check-config run as root without user or allow_root lists that the relay would refuse, exit 78."""
    harness = _harness("sqlite", space, relay_user)
    result = run_cli("check-config", *harness.cli_args, "--command", f"{sendmail.path} -ti", add_allow_root=False)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "mailrelayd: refusing to run as root: set user (--user USER) to the user that relays, or allow_root ="
        " true (--allow-root) to relay as root anyway"]


def test_user_who_cannot_read_python_is_refused(space, sendmail, relay_user, python):
    """Switching to a user who cannot read the Python that runs mailrelayd is refused with one line, exit 78."""
    if python == sys.executable:
        pytest.skip("this Python is readable by the user")
    harness = _harness("sqlite", space, relay_user)
    result = run_cli("--drain", *harness.cli_args, "--user", relay_user.pw_name, "--command", f"{sendmail.path} -ti")
    assert result.returncode == 78
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"user {relay_user.pw_name} cannot read /" in result.stderr


def test_not_root_user_must_be_the_current_user(space, sendmail, relay_user, python):
    """Started as another user than root, user must name that user: any other is one line, exit 78."""
    harness = _harness("sqlite", space, relay_user)
    harness.enqueue(fossil_message())
    as_user = {"user": relay_user.pw_uid, "group": relay_user.pw_gid, "extra_groups": [], "cwd": "/",
               "python": python, "add_allow_root": False}
    other = run_cli("--drain", *harness.cli_args, "--user", "nobody", **as_user)
    assert other.returncode == 78
    assert other.stderr.splitlines() == [f"mailrelayd: user is nobody, but mailrelayd runs as {relay_user.pw_name}:"
                                         f" start it as nobody, or as root (it then switches to nobody)"]
    same = run_cli("--drain", *harness.cli_args, "--user", relay_user.pw_name,
                   "--command", f"{sendmail.path} -ti", **as_user)
    assert same.returncode == 0, same.stderr
    assert len(sendmail.calls()) == 1
