"""End to end through the spool directory with real parts: Fossil (email-send-method dir)
or Trac's sendmail command line writes, mailrelayd drains, msmtp delivers, aiosmtpd receives.

Nothing here is simulated: the spool files are written by the `fossil` binary or by the
injector run as Trac runs it, delivery goes through the `msmtp` binary, and the mail is
read off an SMTP socket.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from mta import (  # noqa: F401  (fixtures are used by name)
    FOSSIL,
    FossilRepo,
    crlf,
    msmtp_command,
    require,
    smtp_sink,
)

pytestmark = pytest.mark.mta

SELF = "noreply@example.org"
BODY = (
    "Checking the spool.\n"
    "A line with = and non-ASCII: caf\u00e9, \u00fcber.\n"
    ".\n"
    "A lone dot above, and a very long line: " + "x" * 90 + "\n"
)


class FossilSpoolRepo(FossilRepo):
    """A real Fossil repository whose alerts are written as files into `spool` (method dir)."""

    def __init__(self, root: Path, spool: Path):
        super().__init__(root, root / "unused-emailqueue.db")
        self.spool = spool
        self.fossil("settings", "email-send-method", "dir", "-R", str(self.path))
        self.fossil("settings", "email-send-dir", str(spool), "-R", str(self.path))

    def files(self) -> dict[str, bytes]:
        """The spool's files, by name, as Fossil wrote them."""
        return {p.name: p.read_bytes() for p in sorted(self.spool.iterdir())}


@pytest.fixture
def fossil_spool(tmp_path) -> FossilSpoolRepo:
    """A fresh Fossil repository set up to write its mail into tmp_path/spool."""
    require(FOSSIL, "fossil")
    root = tmp_path / "fossil"
    root.mkdir()
    spool = tmp_path / "spool"
    spool.mkdir()
    return FossilSpoolRepo(root, spool)


def drain(spool: Path, command: str, *extra: str) -> subprocess.CompletedProcess:
    """`mailrelayd --spool SPOOL --drain --command CMD`, as an administrator would run it."""
    return run_cli("--spool", str(spool), "--drain", "--command", command, "--log-format", "json", *extra)


def test_fossil_test_message_from_spool_arrives_through_msmtp(fossil_spool, smtp_sink, msmtp_command):
    """A Fossil test-message written into the spool reaches the SMTP server once, to both addresses, byte for byte."""
    fossil_spool.test_message("bob@example.com", "carol@example.net", subject="Spool check", body=BODY)
    [(name, data)] = fossil_spool.files().items()
    assert re.fullmatch(r"\d{24}\.email", name)  # Fossil's own naming, not the test's

    proc = drain(fossil_spool.spool, msmtp_command)

    assert proc.returncode == 0, proc.stderr
    assert os.listdir(fossil_spool.spool) == []
    [mail] = smtp_sink.received()
    assert mail.rcpt_tos == ("bob@example.com", "carol@example.net")
    assert mail.mail_from == SELF
    assert mail.data == crlf(data)


def test_fossil_subscriber_alerts_from_spool_arrive_one_each_through_msmtp(fossil_spool, smtp_sink, msmtp_command):
    """Real check-in alerts Fossil writes as spool files for three subscribers arrive as three messages, each to its subscriber."""
    subscribers = ["alice@example.com", "zed@example.net", "yu@example.org"]
    for address in subscribers:
        fossil_spool.add_subscriber(address)
    fossil_spool.commit(message="Add the spool")
    fossil_spool.send_alerts()
    files = fossil_spool.files()
    by_rcpt = {re.search(rb"^To: <([^>]+)>\r?$", data, re.M)[1].decode(): data for data in files.values()}
    assert sorted(by_rcpt) == sorted(subscribers)

    proc = drain(fossil_spool.spool, msmtp_command, "--workers", "3")

    assert proc.returncode == 0, proc.stderr
    assert os.listdir(fossil_spool.spool) == []
    received = smtp_sink.received()
    assert sorted(m.rcpt_tos for m in received) == sorted((a,) for a in subscribers)
    for mail in received:
        assert mail.mail_from == SELF
        assert mail.data == crlf(by_rcpt[mail.rcpt_tos[0]])


TRAC_MESSAGE = (
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=\"utf-8\"\n"
    "Content-Transfer-Encoding: 8bit\n"
    "From: My Project <trac@example.org>\n"
    "To: rcpt1@example.com\n"
    "Subject: [My Project] #42: The spool works\n"
    "X-Trac-Ticket-ID: 42\n"
    "Message-ID: <042.5d1c0e6f0c0e1a2b3c4d5e6f@example.org>\n"
    "Date: Sun, 22 Nov 2026 03:41:57 -0000\n"
    "\n"
    "#42: The spool works\n"
    "Changes (by caf\u00e9):\n"
    ".\n"
    " * status:  new => closed\n"
).encode()


def test_trac_command_line_through_injector_arrives_through_msmtp(tmp_path, smtp_sink, msmtp_command):
    """Trac's `sendmail -i -f FROM RCPT...` through the injector reaches SMTP with exactly that envelope, the Bcc-style recipient unseen in the header."""
    spool = tmp_path / "spool"
    spool.mkdir()
    # What Trac's SendmailEmailSender does: Popen with pipes, message on stdin, stderr must stay empty.
    inject = subprocess.run(
        [sys.executable, "-m", "mailrelayd", "enqueue", "--spool", str(spool),
         "-i", "-f", "trac@example.org", "rcpt1@example.com", "rcpt2@example.com"],
        input=TRAC_MESSAGE, capture_output=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert (inject.returncode, inject.stderr, inject.stdout) == (0, b"", b"")
    assert len(os.listdir(spool)) == 1

    proc = drain(spool, msmtp_command)

    assert proc.returncode == 0, proc.stderr
    assert os.listdir(spool) == []
    [mail] = smtp_sink.received()
    assert mail.rcpt_tos == ("rcpt1@example.com", "rcpt2@example.com")
    assert mail.mail_from == "trac@example.org"
    assert b"rcpt2@example.com" not in mail.data
    assert mail.data == crlf(TRAC_MESSAGE)
