"""The mailrelayd command as an administrator uses it."""

import json
import os
import subprocess
import sys

from mailrelayd.config import OPTIONS
from conftest import ROOT, SqliteHarness, allow_root, fossil_message, run_cli


def drain(harness, fake_sendmail, *extra):
    return run_cli("--drain", *harness.cli_args, "--command", f"{fake_sendmail.path} -ti", *extra)


def test_help_documents_every_setting():
    """--help names a flag for every configuration key."""
    out = run_cli("--help").stdout
    assert all(f"--{o.key.replace('_', '-')}" in out for o in OPTIONS)


def test_drain_exit_zero_when_all_sent(queue_harness, fake_sendmail):
    """`--drain` exits 0 once every message of the pass is sent."""
    queue_harness.enqueue(fossil_message())
    assert drain(queue_harness, fake_sendmail).returncode == 0


def test_drain_exit_75_when_deferred(queue_harness, fake_sendmail):
    """`--drain` exits 75 when a message was deferred."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(75)
    assert drain(queue_harness, fake_sendmail).returncode == 75


def test_drain_exit_65_when_set_aside(queue_harness, fake_sendmail):
    """`--drain` exits 65 when a message was set aside and none deferred."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(65)
    assert drain(queue_harness, fake_sendmail).returncode == 65


def test_missing_database_exits_66_with_one_line(tmp_path, fake_sendmail):
    """A queue file that does not exist: exit 66 and an error naming it."""
    result = run_cli("--drain", "--db", str(tmp_path / "missing.db"), "--log-format", "json")
    assert result.returncode == 66
    errors = [json.loads(line) for line in result.stderr.splitlines() if '"error"' in line]
    assert errors and "missing.db: no such file" in errors[0]["error"]


def test_file_that_is_not_a_database_exits_66(tmp_path):
    """A queue path holding something else: exit 66, the file untouched."""
    path = tmp_path / "emailqueue.db"
    path.write_text("hello\n" * 1000)
    assert run_cli("--drain", "--db", str(path)).returncode == 66
    assert path.read_text() == "hello\n" * 1000


def test_bad_flag_value_exits_78_naming_the_key(tmp_path):
    """A bad value is one line naming the flag, exit 78."""
    result = run_cli("--drain", "--db", str(tmp_path / "q.db"), "--workers", "many")
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        "mailrelayd: bad value for --workers ('many'): expected auto or a whole number from 1 to 256"
    ]


def test_bad_toml_value_exits_78_naming_the_key(tmp_path):
    """A bad value in the file is one line naming the key, exit 78."""
    config = tmp_path / "mailrelayd.toml"
    config.write_text('db = "/x.db"\npoll_interval = "soon"\n')
    result = run_cli("--drain", "--config", str(config))
    assert result.returncode == 78 and "bad value for poll_interval" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_toml_key_exits_78(tmp_path):
    """A misspelt key is refused rather than ignored."""
    config = tmp_path / "mailrelayd.toml"
    config.write_text('db = "/x.db"\nworker = 8\n')
    result = run_cli("--drain", "--config", str(config))
    assert result.returncode == 78 and "unknown key 'worker'" in result.stderr


def test_unparseable_toml_exits_78(tmp_path):
    """A file that is not TOML says so, exit 78."""
    config = tmp_path / "mailrelayd.toml"
    config.write_text("db = \n")
    assert run_cli("--drain", "--config", str(config)).returncode == 78


def test_no_queue_exits_78():
    """Without --db or --spool there is nothing to relay: exit 78."""
    result = run_cli("--drain", "--config", "/dev/null")
    assert result.returncode == 78 and "give one queue" in result.stderr


def test_unknown_flag_is_a_usage_error():
    """An unknown flag exits 64 (EX_USAGE) with one line."""
    result = run_cli("--no-such-flag")
    assert result.returncode == 64 and len(result.stderr.strip().splitlines()) == 1


def test_flags_win_over_the_config_file(tmp_path, fake_sendmail):
    """A flag overrides the same key from the TOML file."""
    harness = SqliteHarness(tmp_path / "q.db")
    harness.enqueue(fossil_message())
    config = tmp_path / "mailrelayd.toml"
    config.write_text(f'db = "{harness.path}"\ncommand = "{fake_sendmail.path} -ti"\n'
                      'envelope_from = "file@example.org"\n')
    run_cli("--drain", "--config", str(config), "--envelope-from", "flag@example.org")
    assert fake_sendmail.calls()[0][0] == ["-ti", "-f", "flag@example.org"]


def test_log_has_one_json_event_per_attempt_without_body(queue_harness, fake_sendmail):
    """Each attempt logs emailid, recipients, subject, size, outcome, attempt and ms, never the body."""
    emailid = queue_harness.enqueue(fossil_message(to="bob@example.com", subject="Hi", body="SECRET-BODY\r\n"))
    result = drain(queue_harness, fake_sendmail, "--log-format", "json")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    [sent] = [e for e in events if e["event"] == "message_sent"]
    assert {k: sent[k] for k in ("emailid", "to", "subject", "outcome", "attempt")} == {
        "emailid": emailid, "to": "bob@example.com", "subject": "Hi", "outcome": "sent", "attempt": 1}
    assert sent["size"] > 0 and sent["ms"] >= 0
    assert "SECRET-BODY" not in result.stderr


def test_console_format_is_key_value(queue_harness, fake_sendmail):
    """--log-format console writes key=value lines."""
    queue_harness.enqueue(fossil_message())
    result = drain(queue_harness, fake_sendmail, "--log-format", "console")
    assert any(line.startswith("timestamp=") and "event=message_sent" in line
               for line in result.stderr.splitlines())


def test_missing_command_defers_and_reports_loudly(queue_harness, tmp_path):
    """A sendmail that is not there keeps the message (exit 75) and logs an error."""
    queue_harness.enqueue(fossil_message())
    result = run_cli("--drain", *queue_harness.cli_args, "--command", str(tmp_path / "nope"),
                     "--log-format", "json")
    assert result.returncode == 75 and queue_harness.queued() == 1
    levels = {json.loads(line)["event"]: json.loads(line)["level"] for line in result.stderr.splitlines()}
    assert levels["command_not_runnable"] == "error" and levels["message_deferred"] == "error"


def test_maildir_drain_needs_no_mta(queue_harness, tmp_path):
    """--maildir delivers into a Maildir: the try-it-out path with no mail system."""
    queue_harness.enqueue(fossil_message())
    result = run_cli("--drain", *queue_harness.cli_args, "--maildir", str(tmp_path / "out"))
    assert result.returncode == 0 and len(list((tmp_path / "out" / "new").iterdir())) == 1


def test_locked_database_exits_66_and_loses_nothing(sqlite_harness, fake_sendmail):
    """While another process holds an exclusive lock, a drain says the database is locked and sends nothing."""
    import sqlite3

    sqlite_harness.enqueue(fossil_message())
    holder = sqlite3.connect(sqlite_harness.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = drain(sqlite_harness, fake_sendmail, "--log-format", "json")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 66 and "database is locked" in result.stderr
    assert fake_sendmail.calls() == [] and sqlite_harness.queued() == 1


def _drain_on_a_terminal(harness, fake_sendmail) -> tuple[int, str]:
    """Run --drain with stderr on a pseudo-terminal; its exit status and what the terminal showed."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mailrelayd", *allow_root(["--drain", *harness.cli_args, "--settle",
                             "0", "--workers", "1", "--command", f"{fake_sendmail.path} -ti"])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"})
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the drain closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=60), shown.decode("utf-8", "replace")


def test_long_drain_on_a_terminal_shows_progress(queue_harness, fake_sendmail):
    """A drain lasting over a second on a terminal shows a progress bar with messages done of the total and a rate."""
    for n in range(4):
        queue_harness.enqueue(fossil_message(subject=f"m{n}"))
    fake_sendmail.take_seconds(0.5)  # four messages one at a time: about two seconds
    status, shown = _drain_on_a_terminal(queue_harness, fake_sendmail)
    assert status == 0
    assert "/4 [" in shown and "msg/s" in shown, shown


def test_drain_into_a_pipe_shows_no_progress(queue_harness, fake_sendmail):
    """With stderr not a terminal, a drain prints log lines only: no progress bar."""
    for n in range(4):
        queue_harness.enqueue(fossil_message(subject=f"m{n}"))
    fake_sendmail.take_seconds(0.5)
    result = run_cli("--drain", *queue_harness.cli_args, "--settle", "0", "--workers", "1",
                     "--command", f"{fake_sendmail.path} -ti")
    assert result.returncode == 0
    assert "msg/s" not in result.stderr and "\r" not in result.stderr
    assert all(line.startswith("{") for line in result.stderr.splitlines())
