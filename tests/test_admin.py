"""The admin commands (status, list, show, retry, purge) as the command line prints them.

They run in process (`mailrelayd.cli.main`), over queues made by real drains through the
fake sendmail; what the queue does underneath is tested in test_queue_admin.py.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from conftest import ROOT, TERMINAL_UNSAFE, SqliteHarness, allow_root, fossil_message, run_cli, wait_until

from mailrelayd import cli


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def admin(capsys):
    """admin(harness, *args): run `mailrelayd ARGS` in process on the harness's queue."""
    def run(harness, *args, queue_args=True):
        capsys.readouterr()
        try:
            code = cli.main(allow_root([*args, *(harness.cli_args if queue_args else [])]))
        except SystemExit as e:  # argparse: a usage error, or --help
            code = e.code
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return run


@pytest.fixture
def status_json(admin):
    def run(harness, *extra):
        result = admin(harness, "status", "--json", *extra)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    return run


@pytest.fixture
def make_deferred(queue_harness, relay_pass):
    def make(to="bob@example.com"):
        queue_harness.enqueue(fossil_message(to=to, subject=f"Deferred {to}"))
        assert relay_pass(75).exit_status == 75
    return make


@pytest.fixture
def make_failed(queue_harness, relay_pass):
    def make(to="bob@example.com"):
        queue_harness.enqueue(fossil_message(to=to, subject=f"Failed {to}"))
        assert relay_pass(65).exit_status == 65
    return make


def ids(result):
    """The message ids `list` printed: its lines but the header and the count."""
    return [line.split()[0] for line in result.stdout.splitlines()[1:] if not line.startswith("--")]


def test_status_json_schema(queue_harness, status_json):
    """`status --json` prints exactly the documented keys with the documented types."""
    queue_harness.enqueue(fossil_message())
    report = status_json(queue_harness)
    assert set(report) == {"queue", "queued", "deferred", "failed", "refused", "sent_24h", "oldest_queued_s",
                           "relay_pid", "next_try", "rate_limit", "rate_used", "concurrency"}
    assert isinstance(report["queue"], str) and os.path.isabs(report["queue"])
    for key in ("queued", "deferred", "failed", "refused"):
        assert type(report[key]) is int
    assert report["sent_24h"] is None or type(report["sent_24h"]) is int
    assert type(report["oldest_queued_s"]) in (int, float)
    assert report["relay_pid"] is None and report["next_try"] is None


def test_status_counts_new_deferred_and_failed(queue_harness, status_json, make_deferred, make_failed):
    """status counts a deferred and a failed message made by real drains, and a new one."""
    make_deferred("a@example.com")
    make_failed("b@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    report = status_json(queue_harness)
    assert (report["queued"], report["deferred"], report["failed"]) == (1, 1, 1)


def test_status_counts_sent_in_last_day(queue_harness, status_json, relay_pass):
    """sent_24h counts sentlog rows (SQLite) or kept sent files (spool with keep_sent), else null."""
    queue_harness.enqueue(fossil_message())
    spool = queue_harness.kind == "spool"
    assert relay_pass(0, **({"keep_sent": True} if spool else {})).exit_status == 0
    assert status_json(queue_harness, *(["--keep-sent"] if spool else []))["sent_24h"] == 1
    if queue_harness.kind == "spool":
        assert status_json(queue_harness)["sent_24h"] is None


def test_status_oldest_age_of_a_new_message(queue_harness, status_json):
    """oldest_queued_s is known even for a message no relay has seen yet."""
    message = fossil_message().replace(b"Date: Sun, 22 Nov 2026 03:41:57 +0000",
                                       time.strftime("Date: %a, %d %b %Y %H:%M:%S +0000",
                                                     time.gmtime(time.time() - 3600)).encode())
    queue_harness.enqueue(message)
    if queue_harness.kind == "spool":
        name = os.listdir(queue_harness.path)[0]
        os.utime(queue_harness.path / name, (time.time() - 3600,) * 2)
    assert 3500 < status_json(queue_harness)["oldest_queued_s"] < 3700


def test_status_human_table(queue_harness, admin, make_deferred):
    """Without --json, status prints one labelled line per figure, naming the next try."""
    make_deferred()
    out = admin(queue_harness, "status").stdout
    assert out.splitlines()[0].split()[0] == "queue"
    assert "next try" in out and "deferred       1" in out


def test_status_json_names_next_try(queue_harness, status_json, make_deferred):
    """`status --json` gives the deferred message's next try as unix time, in the future."""
    make_deferred()
    next_try = status_json(queue_harness)["next_try"]
    assert type(next_try) is float and next_try > time.time()


HOLD_LOCK = """
import os, sys
from pathlib import Path
from mailrelayd.queuelock import QueueLock
assert QueueLock(Path(sys.argv[1])).acquire() is None
print(os.getpid(), flush=True)
sys.stdin.read()
"""


def queue_lock_path(harness):
    """Where the documented lock file is: beside the database file or the spool directory."""
    return harness.path.with_name(harness.path.name + ".mailrelayd.lock")


def test_status_names_the_relay_holding_the_lock(queue_harness, admin, status_json):
    """relay_pid is the pid of the process holding the queue's lock file."""
    queue_harness.enqueue(fossil_message())
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(queue_lock_path(queue_harness))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pid = int(holder.stdout.readline())
        assert status_json(queue_harness)["relay_pid"] == pid
        assert f"relay_pid      {pid}\n" in admin(queue_harness, "status").stdout
    finally:
        holder.communicate("")
    assert status_json(queue_harness)["relay_pid"] is None


def test_status_says_none_without_a_relay(queue_harness, admin):
    """Without a relay holding the lock, the table says relay_pid none."""
    queue_harness.enqueue(fossil_message())
    assert "relay_pid      none\n" in admin(queue_harness, "status").stdout


def test_status_of_missing_queue_exits_66(tmp_path, admin):
    """A queue that cannot be read: exit 66 with one line."""
    result = admin(None, "status", "--db", str(tmp_path / "missing.db"), queue_args=False)
    assert result.returncode == 66 and len(result.stderr.splitlines()) == 1


def test_list_shows_everything_still_to_send(queue_harness, admin, make_deferred):
    """list without a flag shows new and deferred messages, with sender, recipients, attempts and error."""
    make_deferred("a@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    lines = admin(queue_harness, "list").stdout.splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "ID" and lines[-1] == "-- 2 messages"
    deferred = next(line for line in lines if "a@example.com" in line)
    assert "noreply@example.org" in deferred and "attempts=1" in deferred and "exited 75" in deferred
    assert any("c@example.com" in line and "attempts=0" in line for line in lines)


def test_list_deferred_only(queue_harness, admin, make_deferred):
    """list --deferred leaves new messages out."""
    make_deferred("a@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    out = admin(queue_harness, "list", "--deferred").stdout
    assert "a@example.com" in out and "c@example.com" not in out


def test_list_failed_shows_reason(queue_harness, admin, make_failed):
    """list --failed shows set-aside messages with their reason."""
    make_failed()
    lines = admin(queue_harness, "list", "--failed").stdout.splitlines()
    assert len(lines) == 3 and "bob@example.com" in lines[1] and "exited 65" in lines[1]


def test_list_shows_injected_envelope(spool_harness, admin):
    """A spool file from mailrelayd-sendmail is listed with its envelope sender and recipients."""
    injected = run_cli("enqueue", "--spool", str(spool_harness.path), "-f", "trac@example.org",
                       "hidden@example.org", input="To: shown@example.org\nSubject: x\n\nbody\n")
    assert injected.returncode == 0, injected.stderr
    out = admin(spool_harness, "list").stdout
    assert "trac@example.org" in out and "hidden@example.org" in out


def test_show_prints_header_and_history_not_body(queue_harness, admin, relay_pass):
    """show prints the header block and the delivery history, never the body."""
    queue_harness.enqueue(fossil_message(body="Secret body text.\r\n"))
    relay_pass(75)
    ident = ids(admin(queue_harness, "list"))[0]
    result = admin(queue_harness, "show", ident)
    assert result.returncode == 0
    assert "Subject: Hello" in result.stdout and "Secret body" not in result.stdout
    assert "attempts:      1" in result.stdout and "sendmail says no" in result.stdout


def test_show_failed_message_gives_reason(queue_harness, admin, make_failed):
    """show of a failed message (its id from list --failed) prints the reason."""
    make_failed()
    ident = ids(admin(queue_harness, "list", "--failed"))[0]
    out = admin(queue_harness, "show", ident).stdout
    assert "state:         failed" in out and "reason:" in out and "sendmail says no" in out


def test_show_unknown_id_exits_1(queue_harness, admin):
    """show of an id that is not there: exit 1 and one line."""
    queue_harness.enqueue(fossil_message())
    result = admin(queue_harness, "show", "999999")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1


def test_retry_makes_deferred_due_now(queue_harness, admin, status_json, make_deferred, relay_pass):
    """retry ID makes a deferred message due, so the next drain sends it."""
    make_deferred()
    ident = ids(admin(queue_harness, "list"))[0]
    result = admin(queue_harness, "retry", ident)
    assert result.returncode == 0 and result.stdout == f"{ident}: due now\n"
    assert status_json(queue_harness)["deferred"] == 0
    assert relay_pass(0).exit_status == 0
    assert queue_harness.queued() == 0


def test_retry_all(queue_harness, admin, status_json, make_deferred):
    """retry --all makes every deferred message due and prints one line each."""
    make_deferred("a@example.com")
    make_deferred("b@example.com")
    result = admin(queue_harness, "retry", "--all")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    assert status_json(queue_harness)["deferred"] == 0


def test_retry_unknown_id_exits_1(queue_harness, admin, status_json, make_deferred):
    """retry of an id that is not deferred says so and exits 1."""
    make_deferred()
    result = admin(queue_harness, "retry", "424242")
    assert result.returncode == 1 and "424242" in result.stderr
    assert status_json(queue_harness)["deferred"] == 1


def test_retry_failed_puts_message_back(queue_harness, fake_sendmail, admin, status_json, make_failed, relay_pass):
    """retry --failed ID puts the set-aside message back, and the next drain sends it unchanged."""
    make_failed()
    ident = ids(admin(queue_harness, "list", "--failed"))[0]
    result = admin(queue_harness, "retry", "--failed", ident)
    assert result.returncode == 0 and result.stdout.startswith(f"{ident}: back in the queue as ")
    assert status_json(queue_harness)["failed"] == 0 and queue_harness.queued() == 1
    assert relay_pass(0).exit_status == 0
    assert fake_sendmail.bodies()[-1].replace(b"\r\n", b"\n") == fossil_message(
        subject="Failed bob@example.com").replace(b"\r\n", b"\n")


def test_retry_failed_all(queue_harness, admin, make_failed):
    """retry --all --failed puts every failed message back and no reason file or row is left."""
    make_failed("a@example.com")
    make_failed("b@example.com")
    result = admin(queue_harness, "retry", "--all", "--failed")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    assert queue_harness.failed() == [] and queue_harness.queued() == 2


def test_retry_needs_ids_or_all(queue_harness, admin):
    """retry with neither ids nor --all is a usage error."""
    queue_harness.enqueue(fossil_message())
    assert admin(queue_harness, "retry").returncode == 64


def test_purge_failed_deletes_and_names_them(queue_harness, admin, make_failed):
    """purge --failed deletes the failed messages and prints their count and ids."""
    make_failed()
    ident = ids(admin(queue_harness, "list", "--failed"))[0]
    result = admin(queue_harness, "purge", "--failed")
    assert result.returncode == 0 and result.stdout == f"deleted 1 failed messages: {ident}\n"
    assert queue_harness.failed() == []


def test_purge_failed_older_than_keeps_recent(queue_harness, admin, make_failed):
    """purge --failed --older-than keeps failed messages younger than that."""
    make_failed()
    result = admin(queue_harness, "purge", "--failed", "--older-than", "30d")
    assert result.stdout == "deleted 0 failed messages\n"
    assert len(queue_harness.failed()) == 1


def test_purge_sentlog_needs_older_than(queue_harness, admin):
    """purge --sentlog without --older-than is a usage error."""
    queue_harness.enqueue(fossil_message())
    assert admin(queue_harness, "purge", "--sentlog").returncode == 64


def test_purge_sentlog_deletes_only_old(queue_harness, admin, relay_pass):
    """purge --sentlog --older-than deletes only sent records older than asked."""
    queue_harness.enqueue(fossil_message())
    extra = ["--keep-sent"] if queue_harness.kind == "spool" else []
    assert relay_pass(0, **({"keep_sent": True} if extra else {})).exit_status == 0
    kept = admin(queue_harness, "purge", "--sentlog", "--older-than", "1d", *extra)
    assert kept.stdout.startswith("deleted 0 ")
    queue_harness.age_sent_records(2 * 86400)
    purged = admin(queue_harness, "purge", "--sentlog", "--older-than", "1d", *extra)
    assert purged.stdout.startswith("deleted 1 ")


def test_daemon_flags_still_work_beside_subcommands(queue_harness, fake_sendmail):
    """With no subcommand, the relay's own flags work as before."""
    queue_harness.enqueue(fossil_message())
    result = run_cli("--drain", *queue_harness.cli_args, "--command", f"{fake_sendmail.path} -ti", "--settle", "0")
    assert result.returncode == 0 and queue_harness.queued() == 0


def test_list_json_gives_one_object_per_message(queue_harness, admin, make_deferred):
    """list --json prints one JSON object per line (as postqueue -j), with the documented keys."""
    make_deferred("a@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    lines = admin(queue_harness, "list", "--json").stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == 2
    assert all(set(o) == {"id", "state", "size", "sender", "recipients", "attempts", "first_seen", "last_try",
                          "next_try", "last_error", "reason", "failed_at"} for o in objects)
    deferred = next(o for o in objects if o["state"] == "deferred")
    assert deferred["recipients"] == ["a@example.com"] and deferred["attempts"] == 1
    assert deferred["sender"] == "noreply@example.org" and "exited 75" in deferred["last_error"]


def test_purge_failed_by_id_deletes_only_those(queue_harness, admin, make_failed):
    """purge --failed ID deletes that failed message only, as postsuper -d does."""
    make_failed("a@example.com")
    make_failed("b@example.com")
    first, second = ids(admin(queue_harness, "list", "--failed"))
    result = admin(queue_harness, "purge", "--failed", first)
    assert result.returncode == 0 and result.stdout == f"deleted 1 failed messages: {first}\n"
    assert ids(admin(queue_harness, "list", "--failed")) == [second]


def test_purge_of_unknown_failed_id_exits_1(queue_harness, admin, make_failed):
    """purge --failed with an id that is not there says so and exits 1."""
    make_failed()
    result = admin(queue_harness, "purge", "--failed", "F999999" if queue_harness.kind == "sqlite" else "nope")
    assert result.returncode == 1 and "no failed message" in result.stderr
    assert len(ids(admin(queue_harness, "list", "--failed"))) == 1


def test_list_refused_and_purge_refused(spool_harness, admin, fake_sendmail):
    """A spool entry refused unread is listed by list --refused with its reason, and purge --refused deletes it."""
    (spool_harness.path / "empty.email").write_bytes(b"")
    assert run_cli("--drain", *spool_harness.cli_args, "--settle", "0", "--command",
                   f"{fake_sendmail.path} -ti").returncode == 65  # refused, none deferred
    listed = admin(spool_harness, "list", "--refused").stdout.splitlines()
    assert len(listed) == 3 and listed[1].startswith("empty.email ") and "empty file" in listed[1]
    assert admin(spool_harness, "purge", "--refused").stdout == "deleted 1 refused entries: empty.email\n"
    assert not (spool_harness.state / "corrupt" / "empty.email").exists()


@pytest.mark.parametrize("command", [["list", "--drain", "--workers", "9", "--daemon"], ["status", "--command", "x"],
                                     ["show", "1", "--now"], ["retry", "--all", "--json"]])
def test_a_subcommand_takes_only_its_own_flags(queue_harness, admin, command):
    """A flag that is not the command's own (nor the queue's) is a usage error, exit 64, with the usage on one line."""
    result = admin(queue_harness, *command)
    assert result.returncode == 64 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"mailrelayd {command[0]}: unknown option" in line and f"usage: mailrelayd {command[0]}" in line


def test_retry_is_acted_on_by_a_running_daemon_at_once(queue_harness, admin, make_deferred, daemon, fake_sendmail):
    """retry tells the daemon relaying the queue, which sends the message within seconds, not at its next scan."""
    make_deferred()
    d = daemon(*queue_harness.cli_args, "--poll-interval", "1h", "--settle", "0")
    wait_until(lambda: d.logged("relay_started"), what="the daemon to start")
    d.wait_idle()
    fake_sendmail.exit_with(0)
    assert admin(queue_harness, "retry", "--all").returncode == 0
    wait_until(lambda: d.logged("message_sent"), timeout=10, what="the retried message to be sent")
    assert queue_harness.queued() == 0


def test_status_shows_the_rate_limit_and_what_it_used(queue_harness, admin, relay_pass):
    """status names the rate_limit in force and how many messages the queue's record says went in its last period."""
    for i in range(3):
        queue_harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    spool = queue_harness.kind == "spool"
    relay_pass(0, **({"keep_sent": True} if spool else {}))
    config = queue_harness.path.parent / "rate.toml"
    config.write_text('rate_limit = "600/h"\n' + ("keep_sent = true\n" if spool else ""))
    report = json.loads(admin(queue_harness, "status", "--json", "--config", str(config)).stdout)
    assert (report["rate_limit"], report["rate_used"]) == ("600/h", 3)
    table = admin(queue_harness, "status", "--config", str(config)).stdout
    assert "rate_limit     600/h (3 sent in the last period)\n" in table


# -- text from a queue on the administrator's terminal ------------------------------------------

HOSTILE_SUBJECT = "\x1b]52;c;aGk=\x07\rA\u2028\u202eB"  # OSC 52 writes the clipboard; CR; U+2028; a bidi override


def hostile_message(to: str = "bob@example.com") -> bytes:
    """A hostile Subject: with a folded line, and a From: with a byte that is not UTF-8 and an escape sequence."""
    data = fossil_message(to=to, subject=HOSTILE_SUBJECT + "\r\n\tfolded", sender="no\u00ffreply\x1b[2J@example.org")
    return data.replace("\u00ff".encode(), b"\xff")


def assert_terminal_safe(result, keep_tabs: bool = False) -> None:
    """No line the command printed holds a control, separator, bidi or undecodable character."""
    for line in (result.stdout + result.stderr).split("\n"):
        assert not TERMINAL_UNSAFE.search(line.replace("\t", "") if keep_tabs else line), repr(line)


def drain(harness, fake_sendmail, status: int, say: str) -> None:
    fake_sendmail.exit_with(status, say=say)
    run_cli("--drain", *harness.cli_args, "--settle", "0", "--command", f"{fake_sendmail.path} -ti")


def test_list_and_show_escape_text_from_the_queue(queue_harness, admin, fake_sendmail):
    """list and show print a hostile header and error escaped; show keeps its newlines and tabs, never a CR or ESC."""
    queue_harness.enqueue(hostile_message())
    drain(queue_harness, fake_sendmail, 75, say="try \x1b[31mlater\r\u2028")
    listed = admin(queue_harness, "list")
    assert_terminal_safe(listed)
    assert "try \\x1b[31mlater" in listed.stdout
    shown = admin(queue_harness, "show", ids(listed)[0])
    assert shown.returncode == 0
    assert_terminal_safe(shown, keep_tabs=True)
    assert "Subject: \\x1b]52;c;aGk=\\x07\\x0dA\\u2028\\u202eB\n\tfolded\n" in shown.stdout
    assert 'From: "Fossil" <no\\xffreply\\x1b[2J@example.org>\n' in shown.stdout
    assert "last_error:    " in shown.stdout and "try \\x1b[31mlater" in shown.stdout
    assert_terminal_safe(admin(queue_harness, "list", "--deferred"))
    assert_terminal_safe(admin(queue_harness, "status"))


def test_list_and_show_escape_a_recipient_set_aside(queue_harness, admin, fake_sendmail):
    """A message set aside for a To: with a byte that is not UTF-8 and ESC is listed and shown escaped."""
    queue_harness.enqueue(hostile_message(to="b\u00ffob@example.com, \x1bx@example.com"))
    drain(queue_harness, fake_sendmail, 0, say="")
    listed = admin(queue_harness, "list", "--failed")
    assert_terminal_safe(listed)
    assert "not a plain address" in listed.stdout
    shown = admin(queue_harness, "show", ids(listed)[0])
    assert_terminal_safe(shown, keep_tabs=True)
    assert "To: b\\xffob@example.com, \\x1bx@example.com\n" in shown.stdout


def test_commands_escape_spool_names_that_are_not_utf8(spool_harness, admin, fake_sendmail):
    """A spool name with a byte that is not UTF-8 and ESC is listed, shown, retried and purged escaped, errors too."""
    with open(os.path.join(os.fsencode(spool_harness.path), b"bad\xff\x1b[2J.email"), "wb") as f:
        f.write(fossil_message())
    drain(spool_harness, fake_sendmail, 67, say="no \x1b[31mway")
    name = "bad\udcff\x1b[2J.email"
    listed = admin(spool_harness, "list", "--failed")
    assert_terminal_safe(listed)
    assert ids(listed) == ["bad\\xff\\x1b[2J.email"] and "no \\x1b[31mway" in listed.stdout
    shown = admin(spool_harness, "show", name)
    assert_terminal_safe(shown, keep_tabs=True)
    assert "id:            bad\\xff\\x1b[2J.email" in shown.stdout
    for command, shown_as in ((["show", name + "\x1b]0;x\x07"], "\\x1b]0;x\\x07"),
                              (["retry", "--failed", name + "\r"], "\\x0d"),
                              (["purge", "--failed", name + "\u202e"], "\\u202e")):
        missing = admin(spool_harness, *command)
        assert missing.returncode == 1 and f"bad\\xff\\x1b[2J.email{shown_as}" in missing.stderr
        assert_terminal_safe(missing)
    retried = admin(spool_harness, "retry", "--failed", name)
    assert retried.returncode == 0 and retried.stdout.startswith("bad\\xff\\x1b[2J.email: back in the queue as ")
    assert_terminal_safe(retried)
    drain(spool_harness, fake_sendmail, 67, say="no")
    purged = admin(spool_harness, "purge", "--failed")
    assert purged.returncode == 0 and "bad\\xff\\x1b[2J.email" in purged.stdout
    assert_terminal_safe(purged)


def test_check_config_escapes_the_names_a_glob_matches(tmp_path, admin):
    """check-config names the queues a glob matches now under visible escapes (a jail may name a directory)."""
    SqliteHarness(tmp_path / "jail\x1b]0;owned\x07" / "emailqueue.db")
    config = tmp_path / "mailrelayd.toml"
    config.write_text(f'[[queue]]\ndb = "{tmp_path}/*/emailqueue.db"\ncommand = "/bin/true"\n')
    result = admin(None, "check-config", "--config", str(config), queue_args=False)
    assert_terminal_safe(result)
    assert f"# matches now: {tmp_path}/jail\\x1b]0;owned\\x07/emailqueue.db" in result.stdout


def test_status_shows_the_daemons_concurrency(queue_harness, admin, daemon):
    """status shows how many deliveries the daemon relaying the queue lets run at once (its lock file says)."""
    d = daemon(*queue_harness.cli_args, "--workers", "3")
    wait_until(lambda: d.logged("relay_started"), what="the daemon to start")
    wait_until(lambda: json.loads(admin(queue_harness, "status", "--json").stdout)["concurrency"] == 3,
               what="the daemon's concurrency in status")
    assert "concurrency    3\n" in admin(queue_harness, "status").stdout
