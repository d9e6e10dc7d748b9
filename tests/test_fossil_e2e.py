"""End to end with real parts: Fossil queues, mailrelayd drains, msmtp or Postfix delivers, aiosmtpd receives.

Nothing here is simulated: the queue rows are written by the `fossil` binary, delivery goes
through the `msmtp` or Postfix `sendmail` binary, and the mail is read off an SMTP socket.
"""

from __future__ import annotations

import re
import sqlite3

import pytest

from conftest import run_cli, wait_until
from mta import (  # noqa: F401  (fixtures are used by name)
    crlf,
    fossil_repo,
    msmtp_command,
    postfix_instance,
    smtp_sink,
)

pytestmark = pytest.mark.mta

SELF = "noreply@example.org"
BODY = (
    "Checking the relay.\n"
    "A line with = and non-ASCII: caf\u00e9, \u00fcber.\n"
    "From the start of a line, and a very long line: " + "x" * 90 + "\n"
)
DOT_BODY = "before the dot\n.\nafter the dot\n..two dots\n.\n"


def drain(queue, command: str, *extra: str):
    """Run `mailrelayd --drain` on `queue` with `command`, as an administrator would."""
    return run_cli("--db", str(queue), "--drain", "--command", command, "--log-format", "json", *extra)


def table(queue, sql: str) -> list[tuple]:
    with sqlite3.connect(queue) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


def without_received(data: bytes) -> bytes:
    """`data` without the Received: header fields (and their continuation lines) an MTA prepended."""
    return re.sub(rb"\A(?:Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+", b"", data)


def assert_drained(proc, queue, sent: int) -> None:
    assert proc.returncode == 0, proc.stderr
    assert table(queue, "SELECT count(*) FROM email") == [(0,)]
    assert table(queue, "SELECT count(*) FROM sentlog") == [(sent,)]


# -- through msmtp ------------------------------------------------------------------------


def test_test_message_to_several_addresses_arrives_through_msmtp(fossil_repo, smtp_sink, msmtp_command):
    """A Fossil test-message to two addresses reaches the SMTP server once, to both, byte for byte."""
    fossil_repo.test_message("bob@example.com", "carol@example.net", subject="Relay check", body=BODY)
    [(_, row)] = fossil_repo.queued()

    proc = drain(fossil_repo.queue, msmtp_command)

    assert_drained(proc, fossil_repo.queue, sent=1)
    [mail] = smtp_sink.received()
    assert mail.rcpt_tos == ("bob@example.com", "carol@example.net")
    assert mail.mail_from == SELF  # from `-f`: msmtp's own default sender is a different address
    assert mail.data == crlf(row)
    assert table(fossil_repo.queue, "SELECT xto, xfrom, xsubject, xsize FROM sentlog") == [
        ("bob@example.com, carol@example.net", SELF, "Relay check", len(row))
    ]


def test_subscriber_alerts_arrive_one_per_subscriber_through_msmtp(fossil_repo, smtp_sink, msmtp_command):
    """Real check-in alerts for three subscribers arrive as three messages, each to its subscriber only."""
    subscribers = ["alice@example.com", "zed@example.net", "yu@example.org"]
    for address in subscribers:
        fossil_repo.add_subscriber(address)
    fossil_repo.commit(message="Add the relay")
    fossil_repo.send_alerts()
    rows = dict((re.search(rb"^To: <([^>]+)>\r?$", row, re.M)[1].decode(), row) for _, row in fossil_repo.queued())
    assert sorted(rows) == sorted(subscribers)

    proc = drain(fossil_repo.queue, msmtp_command, "--workers", "3")

    assert_drained(proc, fossil_repo.queue, sent=3)
    received = smtp_sink.received()
    assert sorted(m.rcpt_tos for m in received) == sorted((a,) for a in subscribers)
    for mail in received:
        assert mail.mail_from == SELF
        assert mail.data == crlf(rows[mail.rcpt_tos[0]])


def test_lone_dot_line_arrives_intact_through_msmtp(fossil_repo, smtp_sink, msmtp_command):
    """Body lines holding a single dot (and lines starting with dots) survive the pipe and SMTP."""
    fossil_repo.test_message("bob@example.com", subject="Dots", body=DOT_BODY)
    [(_, row)] = fossil_repo.queued()
    assert b"\r\n.\r\nafter the dot\r\n" in row  # Fossil does not escape it

    proc = drain(fossil_repo.queue, msmtp_command)

    assert_drained(proc, fossil_repo.queue, sent=1)
    [mail] = smtp_sink.received()
    assert mail.data == crlf(row)
    assert mail.data.endswith(b"\r\nbefore the dot\r\n.\r\nafter the dot\r\n..two dots\r\n.\r\n")


def test_smtp_5xx_sets_message_aside(fossil_repo, smtp_sink, msmtp_command):
    """A 5xx from the server makes msmtp exit 65, so the message is set aside with the reason and exit 65."""
    smtp_sink.rcpt_reply = "550 5.1.1 No such user here"
    fossil_repo.test_message("nobody@example.com", subject="Bounce", body=BODY)
    [(emailid, row)] = fossil_repo.queued()

    proc = drain(fossil_repo.queue, msmtp_command)

    assert proc.returncode == 65, proc.stderr
    assert smtp_sink.rejected == ["nobody@example.com"] and smtp_sink.received() == []
    assert table(fossil_repo.queue, "SELECT count(*) FROM email") == [(0,)]
    [(failed_id, msg, reason)] = table(fossil_repo.queue, "SELECT emailid, msg, reason FROM mailrelayd_failed")
    assert (failed_id, msg) == (emailid, row)
    assert "exited 65" in reason and "msmtp" in reason
    assert table(fossil_repo.queue, "SELECT count(*) FROM sentlog") == [(0,)]


def test_smtp_4xx_defers_message(fossil_repo, smtp_sink, msmtp_command):
    """A 4xx from the server makes msmtp exit 69, so the message stays queued for a retry and exit is 75."""
    smtp_sink.rcpt_reply = "451 4.3.0 Try again later"
    fossil_repo.test_message("later@example.com", subject="Later", body=BODY)
    [(emailid, row)] = fossil_repo.queued()

    proc = drain(fossil_repo.queue, msmtp_command)

    assert proc.returncode == 75, proc.stderr
    assert smtp_sink.rejected == ["later@example.com"] and smtp_sink.received() == []
    assert fossil_repo.queued() == [(emailid, row)]
    assert table(fossil_repo.queue, "SELECT count(*) FROM mailrelayd_failed") == [(0,)]
    [(attempts, last_error)] = table(fossil_repo.queue,
                                     "SELECT attempts, last_error FROM mailrelayd_queue WHERE emailid = %d" % emailid)
    assert attempts == 1 and "exited 69" in last_error


# -- through a private Postfix ---------------------------------------------------------------


def deliver_through_postfix(fossil_repo, smtp_sink, postfix_instance, expected: int):
    """Drain into Postfix's sendmail, then wait until its smtp client has handed `expected` mails on."""
    proc = drain(fossil_repo.queue, postfix_instance.sendmail)
    assert_drained(proc, fossil_repo.queue, sent=expected)
    wait_until(lambda: len(smtp_sink.received()) >= expected, timeout=45,
               what=f"{expected} messages relayed by Postfix (its log: {postfix_instance.log})")
    wait_until(postfix_instance.queue_empty, timeout=10, what="Postfix's queue to empty")
    received = smtp_sink.received()
    assert len(received) == expected, postfix_instance.maillog()
    return received


def test_test_message_arrives_through_private_postfix(fossil_repo, smtp_sink, postfix_instance):
    """A test-message to two addresses goes through real Postfix (postdrop, pickup, smtp) intact."""
    fossil_repo.test_message("bob@example.com", "carol@example.net", subject="Via Postfix", body=BODY)
    [(_, row)] = fossil_repo.queued()

    [mail] = deliver_through_postfix(fossil_repo, smtp_sink, postfix_instance, expected=1)

    assert mail.mail_from == SELF
    assert sorted(mail.rcpt_tos) == ["bob@example.com", "carol@example.net"]
    assert mail.data.startswith(b"Received: ")
    assert without_received(mail.data) == crlf(row)


def test_subscriber_alerts_arrive_through_private_postfix(fossil_repo, smtp_sink, postfix_instance):
    """Real check-in alerts for two subscribers go through real Postfix, one message each."""
    subscribers = ["alice@example.com", "zed@example.net"]
    for address in subscribers:
        fossil_repo.add_subscriber(address)
    fossil_repo.commit(message="Through Postfix")
    fossil_repo.send_alerts()
    rows = {row for _, row in fossil_repo.queued()}
    assert len(rows) == 2

    received = deliver_through_postfix(fossil_repo, smtp_sink, postfix_instance, expected=2)

    assert sorted(m.rcpt_tos for m in received) == sorted((a,) for a in subscribers)
    assert {without_received(m.data) for m in received} == {crlf(r) for r in rows}
    assert {m.mail_from for m in received} == {SELF}


def test_lone_dot_line_arrives_intact_through_private_postfix(fossil_repo, smtp_sink, postfix_instance):
    """With Postfix's sendmail -ti a line holding a single dot does not end the message early."""
    fossil_repo.test_message("bob@example.com", subject="Dots via Postfix", body=DOT_BODY)
    [(_, row)] = fossil_repo.queued()

    [mail] = deliver_through_postfix(fossil_repo, smtp_sink, postfix_instance, expected=1)

    assert without_received(mail.data) == crlf(row)
    assert mail.data.endswith(b"\r\nbefore the dot\r\n.\r\nafter the dot\r\n..two dots\r\n.\r\n")


# -- header text that is not ASCII, through Postfix to a relay without SMTPUTF8 ----------------

UTF8_SUBJECT = "Caf\u00e9 \u00fcber alles"


def test_utf8_subject_arrives_encoded_through_private_postfix(fossil_repo, smtp_sink, postfix_instance):
    """Fossil writes a subject that is not ASCII as raw UTF-8; encoded by default, it goes through Postfix to a
    relay that does not offer SMTPUTF8 and arrives, with the body and every other field as Fossil wrote them."""
    fossil_repo.test_message("bob@example.com", subject=UTF8_SUBJECT, body=BODY)
    [(_, row)] = fossil_repo.queued()
    assert UTF8_SUBJECT.encode() in row  # raw, as Fossil writes it

    [mail] = deliver_through_postfix(fossil_repo, smtp_sink, postfix_instance, expected=1)

    assert mail.rcpt_tos == ("bob@example.com",) and mail.mail_from == SELF
    encoded = b"Subject: =?utf-8?b?Q2Fmw6kgw7xiZXI=?= alles\r\n"
    assert without_received(mail.data) == crlf(row).replace(f"Subject: {UTF8_SUBJECT}\r\n".encode(), encoded)


def test_utf8_subject_kept_as_it_is_bounces_at_a_relay_without_smtputf8(fossil_repo, smtp_sink, postfix_instance):
    """The cause, reproduced: with utf8_headers = keep, Postfix takes the message (sendmail exits 0, so it is
    logged as sent), marks it SMTPUTF8, and bounces it at the relay, which never gets it."""
    fossil_repo.test_message("bob@example.com", subject=UTF8_SUBJECT, body=BODY)

    proc = drain(fossil_repo.queue, postfix_instance.sendmail, "--utf8-headers", "keep")

    assert_drained(proc, fossil_repo.queue, sent=1)
    bounced = re.compile(r"to=<bob@example\.com>, .* status=bounced \(SMTPUTF8 is required, but was not offered")
    wait_until(lambda: bounced.search(postfix_instance.maillog()), timeout=45,
               what=f"Postfix to bounce the message (its log: {postfix_instance.log})")
    assert [m for m in smtp_sink.received() if m.rcpt_tos == ("bob@example.com",)] == []
