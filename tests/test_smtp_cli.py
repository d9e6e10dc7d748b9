"""`python -m mailrelayd --smtp-server ...` as an administrator runs it, against real servers
on 127.0.0.1 (aiosmtpd with trustme certificates and a real credentials check), over both
queues where the queue matters."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import fossil_message, run_cli
from mta import smtp_sink  # noqa: F401
from test_smtp import PASSWORD, ca, ca_file, server_tls  # noqa: F401  (fixtures are used by name)
from test_smtp_e2e import USER, password_file, smtp_server  # noqa: F401

from aiosmtpd.controller import Controller  # noqa: E402  (test_smtp skips the module without it)


def smtp_flags(port: int, *extra: str) -> list[str]:
    return ["--smtp-server", "127.0.0.1", "--smtp-port", str(port), *extra]


def drain(harness, port: int, *extra: str):
    """`mailrelayd --drain` of `harness`'s queue to 127.0.0.1:port, JSON log lines on stderr."""
    return run_cli("--drain", *harness.cli_args, *smtp_flags(port, *extra), "--log-format", "json")


def events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stderr.splitlines()]


def make_due(harness) -> None:
    """Bring every deferred message's next try to now, as if its retry delay had passed."""
    if harness.kind == "sqlite":
        import sqlite3

        with sqlite3.connect(harness.path) as conn:
            conn.execute("UPDATE mailrelayd_queue SET next_try = 0")
        conn.close()
        return
    for path in (harness.state / "schedule").iterdir():
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "next_try": 0}))


# -- the password ----------------------------------------------------------------------------


def test_password_flag_does_not_exist(tmp_path):
    """`--smtp-password SECRET` is refused as an unknown flag (exit 64), and the secret is not echoed."""
    result = run_cli("--drain", "--db", str(tmp_path / "q.db"), *smtp_flags(25, "--smtp-user", USER),
                     "--smtp-password", PASSWORD)
    assert (result.returncode, PASSWORD in result.stderr) == (64, False), result.stderr
    assert "--smtp-password" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_refused_login_defers_loudly_without_logging_the_password(queue_harness, smtp_server, server_tls, ca_file,
                                                                  tmp_path):
    """A wrong password in the file: exit 75, the message kept, an error logged, the password nowhere in the log."""
    wrong = tmp_path / "wrong-password"
    wrong.write_text("Wr0ng-Pa55word\n")
    server = smtp_server(tls=server_tls)  # its refusal echoes the password it was offered
    queue_harness.enqueue(fossil_message())

    proc = drain(queue_harness, server.port, "--use-tls", "starttls", "--smtp-ca-file", ca_file,
                 "--smtp-user", USER, "--smtp-password-file", str(wrong))

    assert proc.returncode == 75, proc.stderr
    assert queue_harness.queued() == 1 and server.logins == [("PLAIN", False)] and server.mails == []
    [deferred] = [e for e in events(proc) if e["event"] == "message_deferred"]
    assert deferred["level"] == "error" and "535 5.7.8 Credentials alice:" in deferred["reason"]
    assert "Wr0ng-Pa55word" not in proc.stderr


def test_missing_password_file_exits_78_with_one_line(tmp_path):
    """An smtp_password_file that does not exist stops start-up: exit 78, one line naming it."""
    result = run_cli("--drain", "--db", str(tmp_path / "q.db"),
                     *smtp_flags(25, "--smtp-user", USER, "--smtp-password-file", str(tmp_path / "nope")))
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"mailrelayd: cannot read smtp_password_file {tmp_path / 'nope'}: No such file or directory"]


def test_unreadable_password_file_exits_78_with_one_line(tmp_path):
    """An smtp_password_file that cannot be read (here a directory: root reads any file) exits 78 with one line."""
    result = run_cli("--drain", "--db", str(tmp_path / "q.db"),
                     *smtp_flags(25, "--smtp-user", USER, "--smtp-password-file", str(tmp_path)))
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"mailrelayd: cannot read smtp_password_file {tmp_path}: Is a directory"]


# -- configuration -------------------------------------------------------------------------------


def test_unknown_tls_mode_exits_78_with_one_line(tmp_path):
    """`--use-tls bogus` is a configuration error naming the flag."""
    result = run_cli("--drain", "--db", str(tmp_path / "q.db"), *smtp_flags(25, "--use-tls", "bogus"))
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        "mailrelayd: bad value for --use-tls ('bogus'): expected one of starttls, implicit, none"]


def test_smtp_server_and_command_together_exit_78_with_one_line(tmp_path):
    """Two ways to deliver on the command line are refused: exit 78, one line."""
    result = run_cli("--drain", "--db", str(tmp_path / "q.db"), *smtp_flags(25), "--command", "/usr/sbin/sendmail -ti")
    assert result.returncode == 78
    [line] = result.stderr.strip().splitlines()
    assert "command and smtp_server" in line and "choose one way to deliver" in line


class Recorder:
    """aiosmtpd handler keeping (mail_from, rcpt_tos, data) of each message."""

    def __init__(self):
        self.mails = []

    async def handle_DATA(self, server, session, envelope):
        self.mails.append((envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content)))
        return "250 2.0.0 OK"


def test_port_465_means_implicit_tls(sqlite_harness, server_tls, ca_file):
    """`--smtp-port 465` without --use-tls speaks TLS from the first byte, to a server that only speaks that."""
    try:
        socket.create_server(("127.0.0.1", 465)).close()
    except OSError as e:
        pytest.skip(f"cannot listen on 127.0.0.1:465 ({e.strerror}); it needs root and a free port")
    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=465, ssl_context=server_tls,
                            server_hostname="127.0.0.1")
    controller.start()
    try:
        sqlite_harness.enqueue(fossil_message())
        proc = drain(sqlite_harness, 465, "--smtp-ca-file", ca_file, "--smtp-reply-timeout", "5s")
    finally:
        controller.stop()
    assert proc.returncode == 0, proc.stderr
    assert [rcpts for _, rcpts, _ in recorder.mails] == [("bob@example.com",)]


# -- certificates ----------------------------------------------------------------------------------


def test_insecure_warns_then_delivers_despite_untrusted_certificate(queue_harness, smtp_server, server_tls):
    """`--smtp-insecure` logs smtp_certificate_not_verified as a warning, then delivers over a certificate nobody vouches for."""
    server = smtp_server(tls=server_tls)
    queue_harness.enqueue(fossil_message())

    proc = drain(queue_harness, server.port, "--use-tls", "starttls", "--smtp-insecure")

    assert proc.returncode == 0, proc.stderr
    warning = events(proc)[0]
    assert (warning["event"], warning["level"], warning["server"]) == (
        "smtp_certificate_not_verified", "warning", "127.0.0.1")
    assert len(server.mails) == 1 and queue_harness.queued() == 0


def test_untrusted_certificate_defers_without_insecure(queue_harness, smtp_server, server_tls):
    """Without --smtp-insecure (and without the CA in --smtp-ca-file) the same server gets nothing: exit 75."""
    server = smtp_server(tls=server_tls)
    queue_harness.enqueue(fossil_message())

    proc = drain(queue_harness, server.port, "--use-tls", "starttls")

    assert proc.returncode == 75, proc.stderr
    assert server.mail_commands == 0 and queue_harness.queued() == 1
    [deferred] = [e for e in events(proc) if e["event"] == "message_deferred"]
    assert deferred["level"] == "error" and "not trusted" in deferred["reason"]


# -- per-recipient refusals through the whole relay ---------------------------------------------------


TWO = "ok@example.com, busy@example.com"


def test_recipient_refused_for_now_is_retried_alone(queue_harness, smtp_server):
    """451 for one recipient: exit 75, the other has it once; the next drain sends only to the refused one, exit 0."""
    server = smtp_server(rcpt_replies={"busy@example.com": "451 4.2.0 Mailbox busy"})
    queue_harness.enqueue(fossil_message(to=TWO))

    first = drain(queue_harness, server.port, "--use-tls", "none")
    assert first.returncode == 75, first.stderr
    assert [m.rcpt_tos for m in server.mails] == [("ok@example.com",)]
    [(attempts, _, reason)] = queue_harness.deferred()
    assert attempts == 1 and "busy@example.com: 451 4.2.0 Mailbox busy" in reason

    server.rcpt_replies.clear()
    make_due(queue_harness)
    second = drain(queue_harness, server.port, "--use-tls", "none")

    assert second.returncode == 0, second.stderr
    assert [m.rcpt_tos for m in server.mails] == [("ok@example.com",), ("busy@example.com",)]
    assert server.mails[0].data == server.mails[1].data
    assert queue_harness.queued() == 0


def test_recipient_refused_for_good_sets_message_aside(queue_harness, smtp_server):
    """550 for one recipient: exit 65, the other has it once, the message set aside naming the refused one."""
    server = smtp_server(rcpt_replies={"busy@example.com": "550 5.1.1 No such user"})
    queue_harness.enqueue(fossil_message(to=TWO))

    proc = drain(queue_harness, server.port, "--use-tls", "none")

    assert proc.returncode == 65, proc.stderr
    assert [m.rcpt_tos for m in server.mails] == [("ok@example.com",)]
    assert queue_harness.queued() == 0
    [(reason, attempts)] = queue_harness.failed()
    assert attempts == 1 and "busy@example.com: 550 5.1.1 No such user" in reason


# -- the archive -----------------------------------------------------------------------------------------


def test_always_bcc_gets_every_message_only_through_the_envelope(queue_harness, smtp_server):
    """`--smtp-always-bcc` adds the archive to every message's envelope and never to its data."""
    server = smtp_server()
    for i in range(2):
        queue_harness.enqueue(fossil_message(to=f"user{i}@example.com", subject=f"m{i}"))

    proc = drain(queue_harness, server.port, "--use-tls", "none", "--smtp-always-bcc", "archive@x.org")

    assert proc.returncode == 0, proc.stderr
    assert sorted(m.rcpt_tos for m in server.mails) == [("user0@example.com", "archive@x.org"),
                                                       ("user1@example.com", "archive@x.org")]
    assert not any(b"archive" in m.data for m in server.mails)


def test_refused_message_brings_a_notice_through_the_same_server(queue_harness, smtp_sink):
    """A 550 for the only recipient sets the message aside, and the administrator's notice goes through the same SMTP server in the same drain."""
    smtp_sink.rcpt_replies["bob@example.com"] = "550 5.1.1 No such user"
    queue_harness.enqueue(fossil_message(to="bob@example.com", subject="Ticket 7"))
    result = drain(queue_harness, smtp_sink.port, "--use-tls", "none", "--notify-failed", "admin@example.org")
    assert result.returncode == 65, result.stderr
    [notice] = smtp_sink.received()
    assert notice.rcpt_tos == ("admin@example.org",)
    assert b"X-Mailrelayd-Notice: failed" in notice.data and b"550 5.1.1 No such user" in notice.data
    assert [e["event"] for e in events(result)].count("notice_queued") == 1
