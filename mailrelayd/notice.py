"""Messages mailrelayd writes itself: failure notices to the administrator, and the
test message of `mailrelayd test-message`.

A failure notice is queued into the same queue as the message it is about, so it is
retried, logged and set aside like any other; it carries `X-Mailrelayd-Notice`, and a
notice that fails is never the subject of another. It names the message, never quotes
its body. Both are built with the email package (CRLF lines, UTF-8, RFC 2047 headers).
What a notice quotes of the queue (names, subject, recipients, reason) is shown escaped
(mailrelayd.terminal), so no text a jail wrote can make building it fail or reach the
administrator's mail client as controls.
"""

from __future__ import annotations

import email.utils
import socket
from email.message import EmailMessage
from email.policy import SMTP

from mailrelayd.message import Envelope, header_block
from mailrelayd.terminal import clean, one_line

NOTICE_HEADER = "X-Mailrelayd-Notice"


def is_notice(data: bytes) -> bool:
    marker = NOTICE_HEADER.lower().encode() + b":"
    return any(line.lower().startswith(marker) for line in header_block(data).splitlines())


def _one_line(text: object, limit: int) -> str:
    """Text from a queue on one line, cut to `limit` (escapes included): line breaks become
    spaces, and every other control, separator or bidi character, or byte that was not
    UTF-8, a visible escape."""
    return one_line(clean(" ".join(str(text).split())), limit)


def _message(sender: str, to: str, subject: str, now: float | None) -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["To"] = to
    msg["Subject"] = subject
    msg["From"] = sender
    msg["Date"] = email.utils.formatdate(now, localtime=True)
    msg["Message-Id"] = email.utils.make_msgid(domain=sender.rpartition("@")[2] or socket.getfqdn())
    return msg


def failure_notice(to: str, queue: str, message_id: int | str, envelope: Envelope | None, reason: str,
                   now: float) -> bytes:
    """The notice to `to` about message `message_id` of `queue`, set aside for `reason`."""
    subject = _one_line(envelope.subject, 100) if envelope and envelope.subject.strip() else "(no subject)"
    recipients = ", ".join(envelope.recipients) if envelope and envelope.recipients else "(none found)"
    msg = _message(f"mailrelayd <{to}>", to, f"[mailrelayd] undeliverable: {subject}", now)
    msg["Auto-Submitted"] = "auto-generated"
    msg[NOTICE_HEADER] = "failed"
    msg.set_content(
        "mailrelayd could not deliver a message and has set it aside.\n\n"
        f"Queue:      {_one_line(queue, 500)}\n"
        f"Message:    {_one_line(message_id, 300)}\n"
        f"Recipients: {_one_line(recipients, 500)}\n"
        f"Subject:    {subject}\n"
        f"Reason:     {_one_line(reason, 1000)}\n\n"
        "It is kept until you act. With the options you run mailrelayd with (--config, --db or --spool):\n"
        "  mailrelayd list --failed            shows it and its id\n"
        "  mailrelayd retry --failed ID        puts it back in the queue once the cause is fixed\n"
        "  mailrelayd purge --failed           deletes what is set aside\n",
        charset="utf-8", cte="8bit")
    return msg.as_bytes()


def probe_message(sender: str, recipients: list[str], subject: str, body: str) -> bytes:
    """A message shaped like Fossil's: CRLF lines, UTF-8 text, quoted-printable. ValueError
    if the subject is not one printable line."""
    if not subject.isprintable():
        raise ValueError("the subject must be one printable line")
    msg = _message(sender, ", ".join(recipients), subject, None)
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    msg.set_content(text if text.endswith("\n") else text + "\n", charset="utf-8", cte="quoted-printable")
    return msg.as_bytes()
