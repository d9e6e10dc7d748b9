"""The setup admin commands (check-config, test-message) on real queues, through the CLI."""

import os
import sqlite3

from conftest import run_cli


def sendmail_args(fake_sendmail):
    return ["--command", f"{fake_sendmail.path} -ti", "--log-format", "json"]


def test_check_config_ok_prints_effective_config(queue_harness, fake_sendmail, tmp_path):
    """A good configuration exits 0 and prints every key, the password file by path but never its content."""
    secret = tmp_path / "password"
    secret.write_text("s3cret-Pa55word\n")
    config = tmp_path / "mailrelayd.toml"
    config.write_text(f'command = "{fake_sendmail.path} -ti"\nsmtp_password_file = "{secret}"\nworkers = 3\n')
    result = run_cli("check-config", "--config", str(config), *queue_harness.cli_args)
    assert result.returncode == 0, result.stderr
    assert "workers = 3" in result.stdout and f'command = ["{fake_sendmail.path}", "-ti"]' in result.stdout
    assert str(secret) in result.stdout and "readable" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


SMTP_KEYS = ("smtp_server", "smtp_port", "use_tls", "smtp_ca_file", "smtp_insecure", "smtp_user", "smtp_password_file",
             "smtp_allow_plaintext_auth", "smtp_from", "smtp_default_domain", "use_short_addr", "smtp_always_bcc",
             "smtp_helo", "smtp_max_messages", "smtp_idle_timeout", "smtp_connect_timeout", "smtp_reply_timeout")


def test_check_config_prints_every_smtp_key(sqlite_harness, fake_sendmail):
    """check-config prints every SMTP key in order, set or not (then commented out), with the values flags gave."""
    result = run_cli("check-config", *sqlite_harness.cli_args, *sendmail_args(fake_sendmail),
                     "--smtp-port", "587", "--smtp-helo", "relay.example.org")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "smtp_port = 587" in lines and 'smtp_helo = "relay.example.org"' in lines and "# use_tls = (not set)" in lines
    keys = [line.removeprefix("# ").split(" = ")[0] for line in lines if " = " in line]
    assert [k for k in keys if k.startswith(("smtp_", "use_"))] == list(SMTP_KEYS)


def test_check_config_lists_every_problem(tmp_path):
    """A missing command and a missing queue are both reported, one line each, with exit 78."""
    result = run_cli("check-config", "--db", str(tmp_path / "missing.db"), "--command", str(tmp_path / "nosendmail"))
    assert result.returncode == 78
    problems = result.stderr.strip().splitlines()
    assert len(problems) == 2
    assert "nosendmail" in problems[0] and "missing.db" in problems[1]


def test_check_config_missing_spool(tmp_path, fake_sendmail):
    """A spool directory that does not exist is a problem (exit 78)."""
    result = run_cli("check-config", "--spool", str(tmp_path / "nospool"), *sendmail_args(fake_sendmail))
    assert result.returncode == 78
    assert "nospool" in result.stderr


def test_check_config_non_executable_command(queue_harness, tmp_path):
    """A delivery command that exists but cannot be run is reported."""
    script = tmp_path / "sendmail-not-x"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = run_cli("check-config", *queue_harness.cli_args, "--command", str(script))
    assert result.returncode == 78
    assert "not executable" in result.stderr and str(script) in result.stderr


def test_check_config_bad_value(queue_harness):
    """A bad value is a configuration error: its one line and exit 78."""
    result = run_cli("check-config", *queue_harness.cli_args, "--workers", "0")
    assert result.returncode == 78
    assert "--workers" in result.stderr


def test_check_config_changes_nothing(queue_harness, fake_sendmail):
    """check-config leaves the SQLite file's bytes and mtime alone and creates no spool state directory."""
    before = None
    if queue_harness.kind == "sqlite":
        st = os.stat(queue_harness.path)
        before = (queue_harness.path.read_bytes(), st.st_mtime_ns)
    listing = sorted(os.listdir(queue_harness.path.parent))
    result = run_cli("check-config", *queue_harness.cli_args, *sendmail_args(fake_sendmail))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(queue_harness.path.parent)) == listing
    if queue_harness.kind == "sqlite":
        assert (queue_harness.path.read_bytes(), os.stat(queue_harness.path).st_mtime_ns) == before
    else:
        assert not queue_harness.state.exists()


def test_test_message_is_delivered_by_a_drain(queue_harness, fake_sendmail):
    """test-message queues one message that a following drain delivers with its To and Subject."""
    result = run_cli("test-message", "alice@example.com", "--subject", "Relay check", *queue_harness.cli_args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(":")[0].strip()
    assert queue_harness.queued() == 1
    drain = run_cli("--drain", *queue_harness.cli_args, *sendmail_args(fake_sendmail))
    assert drain.returncode == 0, drain.stderr
    [body] = fake_sendmail.bodies()
    headers = body.split(b"\n\n")[0].replace(b"\r", b"").splitlines()
    assert b"To: alice@example.com" in headers and b"Subject: Relay check" in headers


def test_test_message_sqlite_row_is_text(sqlite_harness):
    """On SQLite the message is one row of `email` with msg stored as TEXT, like Fossil's."""
    result = run_cli("test-message", "alice@example.com", *sqlite_harness.cli_args)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(sqlite_harness.path) as conn:
        [(kind, msg)] = conn.execute("SELECT typeof(msg), msg FROM email").fetchall()
    assert kind == "text" and "Subject: Test message from mailrelayd\r\n" in msg


def test_test_message_now_delivers(queue_harness, fake_sendmail):
    """With --now the message is delivered at once and reported sent (exit 0)."""
    result = run_cli("test-message", "alice@example.com", "--now", *queue_harness.cli_args,
                     *sendmail_args(fake_sendmail))
    assert result.returncode == 0, result.stderr
    assert ": sent" in result.stdout
    assert len(fake_sendmail.bodies()) == 1 and queue_harness.queued() == 0


def test_test_message_now_deferred(queue_harness, fake_sendmail):
    """With --now and a sendmail exiting 75 the outcome is reported deferred, with exit 75."""
    fake_sendmail.exit_with(75, say="try later")
    result = run_cli("test-message", "alice@example.com", "--now", *queue_harness.cli_args,
                     *sendmail_args(fake_sendmail))
    assert result.returncode == 75
    assert ": deferred" in result.stdout and "try later" in result.stdout


def test_test_message_bad_recipient(queue_harness):
    """A recipient that is not a plain address is refused with 64 and nothing is queued."""
    result = run_cli("test-message", "Bob <bob@example.com>", *queue_harness.cli_args)
    assert result.returncode == 64
    assert queue_harness.queued() == 0
