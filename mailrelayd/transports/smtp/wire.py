"""SMTP on the wire: the replies read, and the message sent as its DATA section.

Replies are read by smtplib, but a line cut short by a closed connection is taken for a
lost connection, never for a reply. The DATA section is made once per message: CRLF
line endings, the header's Bcc: fields removed (as sendmail -t does: a Bcc: header is
never for the eyes of others), leading dots stuffed, and the final "."; and, when the
header holds text that is not ASCII, a second one with that text as encoded-words
(utf8_headers.py) for servers without SMTPUTF8, unless utf8_headers = keep.
"""

from __future__ import annotations

import re
import smtplib
import socket
from dataclasses import dataclass

from mailrelayd.message import header_block
from mailrelayd.utf8_headers import encode_headers

_MAXLINE = 8192  # the longest reply line taken, as smtplib's


# -- replies ----------------------------------------------------------------------------


def reply_text(code: int, message: bytes | str) -> str:
    """A server's reply as one line of at most 500 characters."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return " ".join(f"{code} {text}".split())[:500]


class Smtp(smtplib.SMTP):
    """smtplib.SMTP that takes a reply line cut short by a closed connection for what it is."""

    _host: str  # what smtplib's connect() would record: STARTTLS checks the certificate against it

    def getreply(self) -> tuple[int, bytes]:
        lines = []
        if self.file is None:
            self.file = sock_of(self).makefile("rb")
        while True:
            try:
                line = self.file.readline(_MAXLINE + 1)
            except OSError as e:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"connection lost: {e}") from e
            if not line.endswith(b"\n"):  # EOF, maybe in mid-line
                self.close()
                raise smtplib.SMTPServerDisconnected("connection closed")
            if len(line) > _MAXLINE:
                self.close()
                raise smtplib.SMTPResponseException(500, "reply line too long")
            lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
                break
            if line[3:4] != b"-":
                break
        return code, b"\n".join(lines)


def sock_of(smtp: smtplib.SMTP) -> socket.socket:
    """The connection's socket; SMTPServerDisconnected if there is none."""
    if smtp.sock is None:
        raise smtplib.SMTPServerDisconnected("not connected")
    return smtp.sock


# -- the message ----------------------------------------------------------------------------

_EOL = re.compile(rb"\r\n|\n|\r")
_BARE_CR = re.compile(rb"\r(?!\n)")
_BCC = re.compile(rb"bcc[ \t]*:", re.IGNORECASE)
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


@dataclass
class Job:
    """One message made ready once, whatever session it goes over: envelope and DATA section."""

    sender: str
    recipients: list[str]
    refused: list[tuple[str, str]]  # (address, why) of those never offered to the server
    wire: bytes  # the DATA section (wire_data) of the message as queued
    eight_bit: bool  # it holds 8-bit bytes: BODY=8BITMIME where offered
    utf8_header: bool = False  # its header holds text that is not ASCII: SMTPUTF8 where offered
    encoded: tuple[bytes, bool] | None = None  # (wire, eight_bit) with that text as encoded-words

    def section(self, smtputf8: bool) -> tuple[bytes, bool]:
        """The DATA section for a server that offers SMTPUTF8 or not, and whether it holds 8-bit bytes."""
        if smtputf8 or self.encoded is None:
            return self.wire, self.eight_bit
        return self.encoded


def make_job(sender: str, recipients: list[str], refused: list[tuple[str, str]], data: bytes,
             encode_utf8: bool = True) -> Job:
    """The Job of one message; with `encode_utf8`, also its form for servers without SMTPUTF8."""
    wire = wire_data(data)
    utf8_header = not header_block(data).isascii()
    encoded = None
    if utf8_header and encode_utf8:
        encoded_wire = wire_data(encode_headers(data))
        encoded = encoded_wire, _EIGHT_BIT.search(encoded_wire) is not None
    return Job(sender, recipients, refused, wire, _EIGHT_BIT.search(wire) is not None, utf8_header, encoded)


def wire_data(data: bytes) -> bytes:
    """The DATA section of the message `data`: CRLF line endings, no Bcc: field, dots
    stuffed, and the final ".".

    A bare CR in the header is a space: it is no line break where the envelope was read
    (nor for sendmail), so it must not start a header line on the wire. In the body it is a
    line end, so that no "CR . CR LF" can end the DATA early at a server (SMTP smuggling)."""
    header = header_block(data)
    if b"\r" in header:
        data = _BARE_CR.sub(b" ", header) + data[len(header):]
    text = _without_bcc(_EOL.sub(b"\r\n", data))
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return _LEADING_DOT.sub(b"..", text) + b".\r\n"


def _without_bcc(text: bytes) -> bytes:
    """`text` (CRLF) without its header's Bcc: fields and their continuation lines."""
    end = 0 if text.startswith(b"\r\n") else text.find(b"\r\n\r\n")
    header, rest = (text, b"") if end < 0 else (text[: end + 2], text[end + 2:])
    if not re.search(rb"(?:^|\n)bcc[ \t]*:", header, re.IGNORECASE):
        return text
    kept, dropping = [], False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = _BCC.match(line) is not None
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest
