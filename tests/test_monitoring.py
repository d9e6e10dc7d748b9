"""`status`, `list` and `show` for a monitoring user who may read the queue but write nothing (issue 10, item 11).

The queue is root's, relayed by real drains and a real daemon (as root, --allow-root, the fake
sendmail); a real unprivileged user (useradd, conftest) that can read it (others may read the
database and its directory; the spool's state is in the user's group, as for a user added to the
relay's group) but write none of it runs the commands. They must work, and create nothing: no
-wal or -shm, no lock file, no state directory.
"""

import json
import os
from pathlib import Path

import pytest
from conftest import SpoolHarness, SqliteHarness, fossil_message, run_cli, tree, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a user and files it may only read")

COMMANDS = {"status": ["status", "--json"], "list": ["list", "--json"], "show": ["show", "{ident}"]}


@pytest.fixture
def monitor(relay_user, python):
    """monitor(*args): run `mailrelayd ARGS` as the unprivileged user."""
    def run(*args: str):
        return run_cli(*args, user=relay_user.pw_uid, group=relay_user.pw_gid, extra_groups=[], cwd="/",
                       python=python, add_allow_root=False)
    return run


def make_queue(kind: str, space: Path, sendmail, relay_user):
    """A queue in root's directory with one deferred message (sendmail exited 75), readable by the user only."""
    root = space / "queue"
    root.mkdir(mode=0o755)
    harness = SqliteHarness(root / "emailqueue.db") if kind == "sqlite" else SpoolHarness(root)
    harness.enqueue(fossil_message())
    sendmail.exit_with(75, say="try later")
    drained = run_cli("--drain", *harness.cli_args, "--settle", "0", "--command", f"{sendmail.path} -ti")
    assert drained.returncode == 75, drained.stderr
    for path in [root, *root.rglob("*")]:  # the state: root's, in the user's group (0750 and 0640)
        os.chown(path, 0, relay_user.pw_gid)
    if kind == "sqlite":
        harness.path.chmod(0o644)
    return harness


def ident_of(harness, monitor) -> str:
    listed = monitor("list", "--json", *harness.cli_args)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout.splitlines()[0])["id"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["sqlite", "spool"])
def test_read_only_user_reads_a_queue_nobody_has_open(kind, command, space, fake_sendmail, relay_user, monitor):
    """With no relay running, a user who may only read the queue gets status, list and show, and they create
    nothing (for SQLite: no -wal or -shm, though the file is in WAL mode)."""
    harness = make_queue(kind, space, fake_sendmail, relay_user)
    ident = ident_of(harness, monitor)
    before = tree(space)
    result = monitor(*[a.format(ident=ident) for a in COMMANDS[command]], *harness.cli_args)
    assert (result.returncode, result.stderr) == (0, "")
    assert "try later" in result.stdout or '"deferred": 1' in result.stdout or "bob@example.com" in result.stdout
    assert tree(space) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_user_reads_the_wal_of_a_running_relay(command, space, fake_sendmail, relay_user, monitor,
                                                          daemon):
    """While a daemon holds the database open in WAL mode, the user reads through its -wal and -shm (what is in
    the WAL included: a message queued meanwhile counts), creating nothing."""
    harness = make_queue("sqlite", space, fake_sendmail, relay_user)
    running = daemon(*harness.cli_args, "--retry-delay", "1h")
    wait_until(lambda: running.logged("service_ready"), what="the daemon to start")
    shm = Path(f"{harness.path}-shm")
    assert shm.exists() and Path(f"{harness.path}-wal").exists()
    harness.enqueue(fossil_message(to="carol@example.com"))  # tried and deferred: recorded in the WAL
    wait_until(lambda: running.logged("message_deferred"), what="the new message deferred")
    ident = ident_of(harness, monitor)
    before = tree(space)
    result = monitor(*[a.format(ident=ident) for a in COMMANDS[command]], *harness.cli_args)
    assert (result.returncode, result.stderr) == (0, "")
    if command == "status":
        assert json.loads(result.stdout)["deferred"] == 2
        assert json.loads(result.stdout)["relay_pid"] == running.pid
    assert tree(space) == before


def test_status_names_the_relay_from_a_lock_file_it_may_not_read(space, fake_sendmail, relay_user, monitor, daemon):
    """A lock file the user may not open still gives the daemon's pid (from /proc/locks), with no traceback."""
    harness = make_queue("sqlite", space, fake_sendmail, relay_user)
    running = daemon(*harness.cli_args, "--retry-delay", "1h")
    wait_until(lambda: running.logged("service_ready"), what="the daemon to start")
    harness.path.with_name("emailqueue.db.mailrelayd.lock").chmod(0o600)
    result = monitor("status", "--json", *harness.cli_args)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout)["relay_pid"] == running.pid


def test_unreadable_shm_of_a_running_relay_is_one_line(space, fake_sendmail, relay_user, monitor, daemon):
    """While a daemon holds the file open, a -shm the user may not read is one line saying what it needs, exit 66."""
    harness = make_queue("sqlite", space, fake_sendmail, relay_user)
    running = daemon(*harness.cli_args, "--retry-delay", "1h")
    wait_until(lambda: running.logged("service_ready"), what="the daemon to start")
    Path(f"{harness.path}-shm").chmod(0o600)
    result = monitor("status", *harness.cli_args)
    assert result.returncode == 66
    [line] = result.stderr.splitlines()
    assert line.startswith(f"mailrelayd: {harness.path}: cannot open its -shm") and "read access" in line


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_user_reads_a_file_no_relay_opened_yet(command, space, relay_user, monitor):
    """A Fossil file no relay has opened (rollback journal, only `email`) is read as it is: the message is new,
    and neither tables nor files are created."""
    root = space / "queue"
    root.mkdir(mode=0o755)
    harness = SqliteHarness(root / "emailqueue.db")
    harness.enqueue(fossil_message())
    harness.path.chmod(0o644)
    before = tree(space)
    result = monitor(*[a.format(ident="1") for a in COMMANDS[command]], *harness.cli_args)
    assert (result.returncode, result.stderr) == (0, "")
    assert '"queued": 1' in result.stdout or "bob@example.com" in result.stdout
    assert tree(space) == before


def test_read_only_user_lists_a_spool_with_no_state_yet(space, relay_user, monitor):
    """A spool no relay has opened (no state directory) is listed, and no state directory is made."""
    harness = SpoolHarness(space / "queue")
    harness.enqueue(fossil_message())
    for path in [harness.path, *harness.path.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    before = tree(space)
    result = monitor("list", *harness.cli_args, "--settle", "0")
    assert (result.returncode, result.stderr) == (0, "")
    assert "bob@example.com" in result.stdout
    assert tree(space) == before and not harness.state.exists()
