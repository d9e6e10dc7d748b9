"""Failure notices: the short message `notify_failed` sends the administrator.

A notice is queued into the same queue as the message it is about, so it is retried,
logged and set aside like any other; it carries `X-Mailrelayd-Notice`, and a notice that
fails is never the subject of another. It names the message, never quotes its body.
"""

from __future__ import annotations

import email.utils
from email.header import Header

from mailrelayd.message import Envelope, header_block

NOTICE_HEADER = "X-Mailrelayd-Notice"


def is_notice(data: bytes) -> bool:
    marker = NOTICE_HEADER.lower().encode() + b":"
    return any(line.lower().startswith(marker) for line in header_block(data).splitlines())


def _one_line(text: str | None, limit: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _header(name: str, value: str) -> str:
    if not value.isascii():
        value = Header(value, "utf-8").encode()
    return f"{name}: {value}\r\n"


def failure_notice(to: str, queue: str, message_id: int | str, envelope: Envelope | None, reason: str,
                   now: float) -> bytes:
    """The notice (CRLF lines, UTF-8) about message `message_id` of `queue`, set aside for `reason`."""
    subject = _one_line(envelope.subject if envelope else None, 100) or "(no subject)"
    recipients = ", ".join(envelope.recipients) if envelope and envelope.recipients else "(none found)"
    head = (
        _header("From", f"mailrelayd <{to}>")
        + _header("To", to)
        + _header("Subject", f"[mailrelayd] undeliverable: {subject}")
        + _header("Date", email.utils.formatdate(now, localtime=True))
        + _header("Message-ID", email.utils.make_msgid("mailrelayd"))
        + _header("Auto-Submitted", "auto-generated")
        + _header(NOTICE_HEADER, "failed")
        + "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    body = (
        "mailrelayd could not deliver a message and has set it aside.\n\n"
        f"Queue:      {queue}\n"
        f"Message:    {message_id}\n"
        f"Recipients: {_one_line(recipients, 500)}\n"
        f"Subject:    {subject}\n"
        f"Reason:     {_one_line(reason, 1000)}\n\n"
        "It is kept until you act. With the options you run mailrelayd with (--config, --db or --spool):\n"
        "  mailrelayd list --failed            shows it and its id\n"
        "  mailrelayd retry --failed ID        puts it back in the queue once the cause is fixed\n"
        "  mailrelayd purge --failed           deletes what is set aside\n"
    )
    return (head + "\r\n" + body.replace("\n", "\r\n")).encode("utf-8")
