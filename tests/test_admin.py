"""The admin commands (status, list, show, retry, purge) on real queues made by real drains."""

import json
import os
import sqlite3
import subprocess
import sys
import time

from conftest import ROOT, fossil_message, run_cli


def drain(harness, fake_sendmail, status=0):
    fake_sendmail.exit_with(status, say="sendmail says no" if status else "")
    return run_cli("--drain", *harness.cli_args, "--command", f"{fake_sendmail.path} -ti", "--log-format", "json")


def admin(harness, *args):
    return run_cli(*args, *harness.cli_args)


def status_json(harness):
    result = admin(harness, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def make_deferred(harness, fake_sendmail, to="bob@example.com"):
    harness.enqueue(fossil_message(to=to, subject=f"Deferred {to}"))
    assert drain(harness, fake_sendmail, 75).returncode == 75


def make_failed(harness, fake_sendmail, to="bob@example.com"):
    harness.enqueue(fossil_message(to=to, subject=f"Failed {to}"))
    assert drain(harness, fake_sendmail, 65).returncode == 65


def ids(result):
    return [line.split()[0] for line in result.stdout.splitlines() if not line.startswith("--")]


def test_status_json_schema(queue_harness):
    """`status --json` prints exactly the documented keys with the documented types."""
    queue_harness.enqueue(fossil_message())
    report = status_json(queue_harness)
    assert set(report) == {"queue", "queued", "deferred", "failed", "sent_24h", "oldest_queued_s", "relay_pid",
                           "next_try"}
    assert isinstance(report["queue"], str) and os.path.isabs(report["queue"])
    for key in ("queued", "deferred", "failed"):
        assert type(report[key]) is int
    assert report["sent_24h"] is None or type(report["sent_24h"]) is int
    assert type(report["oldest_queued_s"]) in (int, float)
    assert report["relay_pid"] is None and report["next_try"] is None


def test_status_counts_new_deferred_and_failed(queue_harness, fake_sendmail):
    """status counts a deferred and a failed message made by real drains, and a new one."""
    make_deferred(queue_harness, fake_sendmail, "a@example.com")
    make_failed(queue_harness, fake_sendmail, "b@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    report = status_json(queue_harness)
    assert (report["queued"], report["deferred"], report["failed"]) == (1, 1, 1)


def test_status_counts_sent_in_last_day(queue_harness, fake_sendmail):
    """sent_24h counts sentlog rows (SQLite) or kept sent files (spool with keep_sent), else null."""
    queue_harness.enqueue(fossil_message())
    extra = ["--keep-sent"] if queue_harness.kind == "spool" else []
    assert run_cli("--drain", *queue_harness.cli_args, *extra, "--command", f"{fake_sendmail.path} -ti").returncode == 0
    result = run_cli("status", "--json", *queue_harness.cli_args, *extra)
    assert json.loads(result.stdout)["sent_24h"] == 1
    if queue_harness.kind == "spool":
        assert status_json(queue_harness)["sent_24h"] is None


def test_status_oldest_age_of_a_new_message(queue_harness):
    """oldest_queued_s is known even for a message no relay has seen yet."""
    message = fossil_message().replace(b"Date: Sun, 22 Nov 2026 03:41:57 +0000",
                                       time.strftime("Date: %a, %d %b %Y %H:%M:%S +0000",
                                                     time.gmtime(time.time() - 3600)).encode())
    queue_harness.enqueue(message)
    if queue_harness.kind == "spool":
        name = os.listdir(queue_harness.path)[0]
        os.utime(queue_harness.path / name, (time.time() - 3600,) * 2)
    assert 3500 < status_json(queue_harness)["oldest_queued_s"] < 3700


def test_status_human_table(queue_harness, fake_sendmail):
    """Without --json, status prints one labelled line per figure, naming the next try."""
    make_deferred(queue_harness, fake_sendmail)
    out = admin(queue_harness, "status").stdout
    assert out.splitlines()[0].split()[0] == "queue"
    assert "next try" in out and "deferred       1" in out


def test_status_json_names_next_try(queue_harness, fake_sendmail):
    """`status --json` gives the deferred message's next try as unix time, in the future."""
    make_deferred(queue_harness, fake_sendmail)
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


def test_status_names_the_relay_holding_the_lock(queue_harness):
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


def test_status_says_none_without_a_relay(queue_harness):
    """Without a relay holding the lock, the table says relay_pid none."""
    queue_harness.enqueue(fossil_message())
    assert "relay_pid      none\n" in admin(queue_harness, "status").stdout


def test_status_of_missing_queue_exits_66(tmp_path):
    """A queue that cannot be read: exit 66 with one line."""
    result = run_cli("status", "--db", str(tmp_path / "missing.db"))
    assert result.returncode == 66 and len(result.stderr.splitlines()) == 1


def test_list_shows_everything_still_to_send(queue_harness, fake_sendmail):
    """list without a flag shows new and deferred messages, with sender, recipients, attempts and error."""
    make_deferred(queue_harness, fake_sendmail, "a@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    lines = admin(queue_harness, "list").stdout.splitlines()
    assert len(lines) == 3 and lines[-1] == "-- 2 messages"
    deferred = next(line for line in lines if "a@example.com" in line)
    assert "noreply@example.org" in deferred and "attempts=1" in deferred and "exited 75" in deferred
    assert any("c@example.com" in line and "attempts=0" in line for line in lines)


def test_list_deferred_only(queue_harness, fake_sendmail):
    """list --deferred leaves new messages out."""
    make_deferred(queue_harness, fake_sendmail, "a@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    out = admin(queue_harness, "list", "--deferred").stdout
    assert "a@example.com" in out and "c@example.com" not in out


def test_list_failed_shows_reason(queue_harness, fake_sendmail):
    """list --failed shows set-aside messages with their reason."""
    make_failed(queue_harness, fake_sendmail)
    lines = admin(queue_harness, "list", "--failed").stdout.splitlines()
    assert len(lines) == 2 and "bob@example.com" in lines[0] and "exited 65" in lines[0]


def test_list_shows_injected_envelope(tmp_path):
    """A spool file from mailrelayd-sendmail is listed with its envelope sender and recipients."""
    spool = tmp_path / "spool"
    spool.mkdir()
    injected = run_cli("enqueue", "--spool", str(spool), "-f", "trac@example.org", "hidden@example.org",
                       input="To: shown@example.org\nSubject: x\n\nbody\n")
    assert injected.returncode == 0, injected.stderr
    out = run_cli("list", "--spool", str(spool)).stdout
    assert "trac@example.org" in out and "hidden@example.org" in out


def test_show_prints_header_and_history_not_body(queue_harness, fake_sendmail):
    """show prints the header block and the delivery history, never the body."""
    queue_harness.enqueue(fossil_message(body="Secret body text.\r\n"))
    drain(queue_harness, fake_sendmail, 75)
    ident = ids(admin(queue_harness, "list"))[0]
    result = admin(queue_harness, "show", ident)
    assert result.returncode == 0
    assert "Subject: Hello" in result.stdout and "Secret body" not in result.stdout
    assert "attempts:      1" in result.stdout and "sendmail says no" in result.stdout


def test_show_failed_message_gives_reason(queue_harness, fake_sendmail):
    """show of a failed message (its id from list --failed) prints the reason."""
    make_failed(queue_harness, fake_sendmail)
    ident = ids(admin(queue_harness, "list", "--failed"))[0]
    out = admin(queue_harness, "show", ident).stdout
    assert "state:         failed" in out and "reason:" in out and "sendmail says no" in out


def test_show_unknown_id_exits_1(queue_harness):
    """show of an id that is not there: exit 1 and one line."""
    queue_harness.enqueue(fossil_message())
    result = admin(queue_harness, "show", "999999")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1


def test_retry_makes_deferred_due_now(queue_harness, fake_sendmail):
    """retry ID makes a deferred message due, so the next drain sends it."""
    make_deferred(queue_harness, fake_sendmail)
    ident = ids(admin(queue_harness, "list"))[0]
    result = admin(queue_harness, "retry", ident)
    assert result.returncode == 0 and result.stdout == f"{ident}: due now\n"
    assert status_json(queue_harness)["deferred"] == 0
    assert drain(queue_harness, fake_sendmail, 0).returncode == 0
    assert queue_harness.queued() == 0


def test_retry_all(queue_harness, fake_sendmail):
    """retry --all makes every deferred message due and prints one line each."""
    make_deferred(queue_harness, fake_sendmail, "a@example.com")
    make_deferred(queue_harness, fake_sendmail, "b@example.com")
    result = admin(queue_harness, "retry", "--all")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    assert status_json(queue_harness)["deferred"] == 0


def test_retry_unknown_id_exits_1(queue_harness, fake_sendmail):
    """retry of an id that is not deferred says so and exits 1."""
    make_deferred(queue_harness, fake_sendmail)
    result = admin(queue_harness, "retry", "424242")
    assert result.returncode == 1 and "424242" in result.stderr
    assert status_json(queue_harness)["deferred"] == 1


def test_retry_failed_puts_message_back(queue_harness, fake_sendmail):
    """retry --failed ID puts the set-aside message back, and the next drain sends it unchanged."""
    make_failed(queue_harness, fake_sendmail)
    ident = ids(admin(queue_harness, "list", "--failed"))[0]
    result = admin(queue_harness, "retry", "--failed", ident)
    assert result.returncode == 0 and result.stdout.startswith(f"{ident}: back in the queue as ")
    assert status_json(queue_harness)["failed"] == 0 and queue_harness.queued() == 1
    assert drain(queue_harness, fake_sendmail, 0).returncode == 0
    assert fake_sendmail.bodies()[-1].replace(b"\r\n", b"\n") == fossil_message(
        subject="Failed bob@example.com").replace(b"\r\n", b"\n")


def test_retry_failed_all(queue_harness, fake_sendmail):
    """retry --all --failed puts every failed message back and no reason file or row is left."""
    make_failed(queue_harness, fake_sendmail, "a@example.com")
    make_failed(queue_harness, fake_sendmail, "b@example.com")
    result = admin(queue_harness, "retry", "--all", "--failed")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    assert queue_harness.failed() == [] and queue_harness.queued() == 2


def test_retry_needs_ids_or_all(queue_harness):
    """retry with neither ids nor --all is a usage error."""
    queue_harness.enqueue(fossil_message())
    assert admin(queue_harness, "retry").returncode == 64


def test_purge_failed_deletes_and_names_them(queue_harness, fake_sendmail):
    """purge --failed deletes the failed messages and prints their count and ids."""
    make_failed(queue_harness, fake_sendmail)
    ident = ids(admin(queue_harness, "list", "--failed"))[0]
    result = admin(queue_harness, "purge", "--failed")
    assert result.returncode == 0 and result.stdout == f"deleted 1 failed messages: {ident}\n"
    assert queue_harness.failed() == []


def test_purge_failed_older_than_keeps_recent(queue_harness, fake_sendmail):
    """purge --failed --older-than keeps failed messages younger than that."""
    make_failed(queue_harness, fake_sendmail)
    result = admin(queue_harness, "purge", "--failed", "--older-than", "30d")
    assert result.stdout == "deleted 0 failed messages\n"
    assert len(queue_harness.failed()) == 1


def test_purge_sentlog_needs_older_than(queue_harness):
    """purge --sentlog without --older-than is a usage error."""
    queue_harness.enqueue(fossil_message())
    assert admin(queue_harness, "purge", "--sentlog").returncode == 64


def test_purge_sentlog_deletes_only_old(queue_harness, fake_sendmail):
    """purge --sentlog --older-than deletes only sent records older than asked."""
    queue_harness.enqueue(fossil_message())
    extra = ["--keep-sent"] if queue_harness.kind == "spool" else []
    assert run_cli("--drain", *queue_harness.cli_args, *extra, "--command", f"{fake_sendmail.path} -ti").returncode == 0
    kept = run_cli("purge", "--sentlog", "--older-than", "1d", *queue_harness.cli_args, *extra)
    assert kept.stdout.startswith("deleted 0 ")
    if queue_harness.kind == "sqlite":
        with sqlite3.connect(queue_harness.path) as conn:
            conn.execute("UPDATE sentlog SET mtime = mtime - 2 * 86400")
    else:
        sent = queue_harness.state / "sent"
        for name in os.listdir(sent):
            os.utime(sent / name, (time.time() - 2 * 86400,) * 2)
    purged = run_cli("purge", "--sentlog", "--older-than", "1d", *queue_harness.cli_args, *extra)
    assert purged.stdout.startswith("deleted 1 ")


def test_daemon_flags_still_work_beside_subcommands(queue_harness, fake_sendmail):
    """With no subcommand, the relay's own flags work as before."""
    queue_harness.enqueue(fossil_message())
    assert drain(queue_harness, fake_sendmail, 0).returncode == 0 and queue_harness.queued() == 0
