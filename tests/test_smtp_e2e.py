"""End to end over SMTP with real parts: the `fossil` binary queues (emailqueue.db or a spool
directory), `python -m mailrelayd --drain --smtp-server ...` delivers over STARTTLS with AUTH,
and an aiosmtpd server with a trustme certificate and a real credentials check receives.

`AuthServer` (the STARTTLS and AUTH server) and `smtp_server` are shared with test_smtp_cli.py.
"""

from __future__ import annotations

import os
import re
import sqlite3

import pytest

from conftest import run_cli
from mta import crlf, fossil_repo  # noqa: F401  (fixtures are used by name)
from test_smtp import PASSWORD, Server, ca, ca_file, running_servers, server_tls  # noqa: F401
from test_spool_e2e import fossil_spool  # noqa: F401

from aiosmtpd.smtp import AuthResult  # noqa: E402  (test_smtp skips the module without it)

pytestmark = pytest.mark.mta

USER = "alice"
SELF = "noreply@example.org"
BODY = (
    "Checking the SMTP relay.\n"
    "A line with = and non-ASCII: caf\u00e9, \u00fcber.\n"
    ".\n"
    "A lone dot above, and a very long line: " + "x" * 90 + "\n"
)


class AuthServer(Server):
    """test_smtp's Server, logging in `alice` with PASSWORD; a refusal echoes what was offered,
    as a careless server might, so that any leak of it into mailrelayd's log shows."""

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login, auth_data.password) == (USER.encode(), PASSWORD.encode())
        with self._lock:
            self.logins.append((mechanism, ok))
        if ok:
            return AuthResult(success=True)
        offered = f"{auth_data.login.decode()}:{auth_data.password.decode()}"
        return AuthResult(success=False, handled=False, message=f"535 5.7.8 Credentials {offered} invalid")


@pytest.fixture
def smtp_server():
    """smtp_server(**Server fields) -> a started AuthServer on 127.0.0.1; all stopped at teardown."""
    yield from running_servers(AuthServer)


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "smtp-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def smtp_args(server, ca_file: str, password_file) -> list[str]:
    """The flags an administrator gives for a private smarthost with STARTTLS and a login."""
    return ["--smtp-server", "127.0.0.1", "--smtp-port", str(server.port), "--use-tls", "starttls",
            "--smtp-ca-file", ca_file, "--smtp-user", USER, "--smtp-password-file", str(password_file)]


def drain(queue_args: list[str], server, ca_file: str, password_file, *extra: str):
    return run_cli("--drain", *queue_args, *smtp_args(server, ca_file, password_file), "--log-format", "json",
                   *extra)


def table(queue, sql: str) -> list[tuple]:
    with sqlite3.connect(queue) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


def assert_db_drained(proc, queue, sent: int) -> None:
    assert proc.returncode == 0, proc.stderr
    assert table(queue, "SELECT count(*) FROM email") == [(0,)]
    assert table(queue, "SELECT count(*) FROM sentlog") == [(sent,)]


def assert_spool_drained(proc, spool) -> None:
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(spool) == []
    state = spool.with_name(spool.name + ".mailrelayd")
    assert [p.name for kind in ("deferred", "failed", "corrupt") for p in (state / kind).iterdir()] == []


def by_recipient(rows) -> dict[str, bytes]:
    return {re.search(rb"^To: <([^>]+)>\r?$", row, re.M)[1].decode(): row for row in rows}


# -- emailqueue.db --------------------------------------------------------------------------


def test_test_message_arrives_byte_for_byte_over_starttls_with_auth(fossil_repo, smtp_server, server_tls, ca_file,
                                                                    password_file):
    """A Fossil test-message to two addresses arrives once, over STARTTLS after a checked login, byte for byte."""
    server = smtp_server(tls=server_tls)
    fossil_repo.test_message("bob@example.com", "carol@example.net", subject="SMTP check", body=BODY)
    [(_, row)] = fossil_repo.queued()
    assert not re.search(rb"^Bcc:", row, re.M | re.I)

    proc = drain(["--db", str(fossil_repo.queue)], server, ca_file, password_file)

    assert_db_drained(proc, fossil_repo.queue, sent=1)
    assert server.logins == [("PLAIN", True)]
    [mail] = server.mails
    assert (mail.mail_from, mail.rcpt_tos) == (SELF, ("bob@example.com", "carol@example.net"))
    assert mail.data == crlf(row)
    assert table(fossil_repo.queue, "SELECT xto, xfrom, xsubject, xsize FROM sentlog") == [
        ("bob@example.com, carol@example.net", SELF, "SMTP check", len(row))
    ]


def test_subscriber_alerts_arrive_one_per_subscriber_over_smtp(fossil_repo, smtp_server, server_tls, ca_file,
                                                              password_file):
    """Real check-in alerts for three subscribers arrive as three messages, each to its subscriber, byte for byte."""
    server = smtp_server(tls=server_tls)
    subscribers = ["alice@example.com", "zed@example.net", "yu@example.org"]
    for address in subscribers:
        fossil_repo.add_subscriber(address)
    fossil_repo.commit(message="Add the SMTP transport")
    fossil_repo.send_alerts()
    rows = by_recipient(row for _, row in fossil_repo.queued())
    assert sorted(rows) == sorted(subscribers)

    proc = drain(["--db", str(fossil_repo.queue)], server, ca_file, password_file, "--workers", "3")

    assert_db_drained(proc, fossil_repo.queue, sent=3)
    assert server.logins and all(ok for _, ok in server.logins)
    assert sorted(m.rcpt_tos for m in server.mails) == sorted((a,) for a in subscribers)
    for mail in server.mails:
        assert mail.mail_from == SELF
        assert mail.data == crlf(rows[mail.rcpt_tos[0]])


# -- the spool directory ------------------------------------------------------------------------


def test_test_message_from_spool_arrives_byte_for_byte_over_smtp(fossil_spool, smtp_server, server_tls, ca_file,
                                                                 password_file):
    """A Fossil test-message written into the spool arrives once, to both addresses, byte for byte."""
    server = smtp_server(tls=server_tls)
    fossil_spool.test_message("bob@example.com", "carol@example.net", subject="Spool over SMTP", body=BODY)
    [data] = fossil_spool.files().values()

    proc = drain(["--spool", str(fossil_spool.spool)], server, ca_file, password_file)

    assert_spool_drained(proc, fossil_spool.spool)
    assert server.logins == [("PLAIN", True)]
    [mail] = server.mails
    assert (mail.mail_from, mail.rcpt_tos) == (SELF, ("bob@example.com", "carol@example.net"))
    assert mail.data == crlf(data)


def test_subscriber_alerts_from_spool_arrive_one_per_subscriber_over_smtp(fossil_spool, smtp_server, server_tls,
                                                                         ca_file, password_file):
    """Real check-in alerts Fossil writes as spool files arrive as one message per subscriber, byte for byte."""
    server = smtp_server(tls=server_tls)
    subscribers = ["alice@example.com", "zed@example.net", "yu@example.org"]
    for address in subscribers:
        fossil_spool.add_subscriber(address)
    fossil_spool.commit(message="Spool over SMTP")
    fossil_spool.send_alerts()
    files = by_recipient(fossil_spool.files().values())
    assert sorted(files) == sorted(subscribers)

    proc = drain(["--spool", str(fossil_spool.spool)], server, ca_file, password_file, "--workers", "3")

    assert_spool_drained(proc, fossil_spool.spool)
    assert sorted(m.rcpt_tos for m in server.mails) == sorted((a,) for a in subscribers)
    for mail in server.mails:
        assert mail.mail_from == SELF
        assert mail.data == crlf(files[mail.rcpt_tos[0]])
