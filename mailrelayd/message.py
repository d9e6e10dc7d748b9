"""Read what delivery needs from a queued RFC 822 message, without touching its body.

Only the header fields delivery needs are read; the message itself is passed on byte for byte.
Messages come from inside a jail, so nothing here trusts them: an address is only
offered for a command line when it is plainly an address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from email.header import decode_header, make_header
from email.utils import getaddresses, parsedate_to_datetime

from mailrelayd.inject import is_plain_address

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_LINE = re.compile(rb"[!-9;-~]+:")


class MalformedMessage(ValueError):
    """The queued data cannot be delivered as a message (no header, no recipients)."""


@dataclass(frozen=True)
class Envelope:
    """Who a message is from and to, and what to log about it.

    `sender` is the envelope sender taken from Sender:, else From:, or None when the
    header holds nothing safe to pass on. `recipients` come from To:, Cc: and Bcc:,
    unless `explicit`: then they were given with the message (by mailrelayd-sendmail)
    and are exactly who gets it.
    """

    sender: str | None
    recipients: tuple[str, ...]
    from_address: str
    to_header: str
    subject: str
    size: int
    explicit: bool = False
    remaining: bool = False  # the recipients left after a partial send; the others had it


def header_block(data: bytes) -> bytes:
    """The message's header lines, without the blank line that ends them."""
    end = _HEADER_END.search(data)
    return data if end is None else data[: end.start()]


def read_envelope(data: bytes) -> Envelope:
    """Parse the header of `data`; raise MalformedMessage if it cannot be mailed."""
    header = header_block(data)
    if not _FIELD_LINE.match(header):
        raise MalformedMessage("message has no header")
    fields = _fields(header)
    recipients = tuple(_addresses([v for name in ("to", "cc", "bcc") for v in fields.get(name, [])]))
    if not recipients:
        raise MalformedMessage("message has no recipients in To:, Cc: or Bcc:")
    return _envelope(fields, recipients, len(data))


def explicit_envelope(data: bytes, sender: str, recipients: tuple[str, ...]) -> Envelope:
    """The envelope recorded beside a message: exactly these recipients, this sender
    (else the header's); the header, if any, only names the message in logs."""
    header = header_block(data)
    fields = _fields(header) if _FIELD_LINE.match(header) else {}
    envelope = _envelope(fields, recipients, len(data), explicit=True)
    return replace(envelope, sender=safe_address(sender) or envelope.sender) if sender else envelope


def _envelope(fields: dict[str, list[str]], recipients: tuple[str, ...], size: int, explicit: bool = False) -> Envelope:
    from_address = _first_address(fields.get("from", []))
    return Envelope(
        sender=safe_address(_first_address(fields.get("sender", [])) or from_address),
        recipients=recipients,
        from_address=_printable(from_address),
        to_header=_printable(", ".join(_addresses(fields.get("to", [])))),
        subject=_decoded(fields.get("subject", [""])[0]),
        size=size,
        explicit=explicit,
    )


_WANTED = {"to", "cc", "bcc", "from", "sender", "subject"}


def _fields(header: bytes) -> dict[str, list[str]]:
    """The unfolded values of the header fields delivery needs, by lower-case name.

    Bytes that are not UTF-8 become lone surrogates, which no address check accepts.
    """
    fields: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in header.decode("utf-8", "surrogateescape").split("\n"):
        if line[:1] in (" ", "\t"):
            if current is not None:
                current[-1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        current = fields.setdefault(name, []) if colon and name in _WANTED else None
        if current is not None:
            current.append(value.strip())
    return fields


def safe_address(address: str) -> str | None:
    """`address` if it may be put on a command line or in MAIL FROM (a plain local@domain,
    by the one rule of mailrelayd.inject), else None."""
    return address if is_plain_address(address, need_domain=True) else None


def to_lf(data: bytes) -> bytes:
    """The message with local (LF) line endings, as a sendmail pipe expects."""
    return data.replace(b"\r\n", b"\n")


def _first_address(values: list[str]) -> str:
    addresses = _addresses(values)
    return addresses[0] if addresses else ""


# One address of a list as Fossil writes them: `a@x`, `<a@x>`, `Name <a@x>`, `"Name" <a@x>`,
# with dot-atom local part and domain; anything else goes to the email package.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_PLAIN = rf"{_DOT_ATOM}(?:@{_DOT_ATOM})?"
_PLAIN_MEMBER = re.compile(rf'\s*(?:"[^"\\,]*"\s*|[^"<>,()\\;:@.]*)<({_PLAIN})>\s*|\s*({_PLAIN})\s*')


def _addresses(values: list[str]) -> list[str]:
    """The addresses in header values: a quick path for plain lists, the email package
    for anything else (comments, quoted commas, groups)."""
    found = []
    for value in values:
        members = value.split(",")
        matches = [_PLAIN_MEMBER.fullmatch(m) for m in members if m.strip()]
        plain = [m for m in matches if m is not None]
        if len(plain) == len(matches):
            found += [m[1] or m[2] for m in plain]
        else:
            found += [a for _, a in getaddresses([value]) if a.strip()]
    return found


def _decoded(value: str) -> str:
    try:
        text = str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        text = str(value)
    return _printable(" ".join(text.split()))[:200]


def _printable(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8", "replace")


def date_header(data: bytes, now: float) -> float | None:
    """The message's Date: as unix time, if it has a plausible one (not after `now`)."""
    for line in header_block(data).decode("utf-8", "replace").splitlines():
        if line.lower().startswith("date:"):
            try:
                when = parsedate_to_datetime(line[5:].strip()).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            return when if when <= now else None
    return None
