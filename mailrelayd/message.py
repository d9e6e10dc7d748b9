"""Read what delivery needs from a queued RFC 822 message, without touching its body.

Only the header fields delivery needs are read; the message itself is passed on byte for byte.
Messages come from inside a jail, so nothing here trusts them: a header larger than
MAX_HEADER is not parsed, whatever the email package raises on a hostile header becomes
MalformedMessage, every recipient must be a plain address, and the sender is only offered
for a command line when it is plainly an address. Text that is only logged (the subject)
is decoded if it can be and kept as it is if not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from email.header import decode_header, make_header
from email.utils import getaddresses, parsedate_to_datetime

from mailrelayd.inject import is_plain_address

MAX_HEADER = 64 * 1024  # bytes: Fossil's headers are about one KiB
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_LINE = re.compile(rb"[!-9;-~]+:")


class MalformedMessage(ValueError):
    """The queued data cannot be delivered as a message (no header, no recipients, an
    unreadable or oversized header, a recipient that is not a plain address)."""


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
    """Parse the header of `data`; raise MalformedMessage (and nothing else) if it cannot
    be mailed."""
    header = _header(data)
    try:
        fields = _fields(header)
        recipients = tuple(_addresses([v for name in ("to", "cc", "bcc") for v in fields.get(name, [])]))
        if not recipients:
            raise MalformedMessage("message has no recipients in To:, Cc: or Bcc:")
        for recipient in recipients:
            if not is_plain_address(recipient):  # a bare local name is one (smtp_default_domain completes it)
                raise MalformedMessage(f"recipient {_printable(recipient)[:100]!r} is not a plain address")
        return _envelope(fields, recipients, len(data))
    except MalformedMessage:
        raise
    except Exception as e:  # noqa: BLE001 -- the email package raises all kinds on hostile headers
        raise MalformedMessage(f"unreadable header ({type(e).__name__})") from None


def explicit_envelope(data: bytes, sender: str, recipients: tuple[str, ...]) -> Envelope:
    """The envelope recorded beside a message: exactly these recipients (plain addresses,
    checked where they were read), this sender (else the header's); the header, if any,
    only names the message in logs."""
    try:
        envelope = _envelope(_fields(_header(data)), recipients, len(data), explicit=True)
    except Exception:  # noqa: BLE001 -- an unreadable header only loses the names in the log
        envelope = Envelope(None, recipients, "", "", "", len(data), explicit=True)
    return replace(envelope, sender=safe_address(sender) or envelope.sender) if sender else envelope


def _header(data: bytes) -> bytes:
    """The header block, if there is one of a sane size; else MalformedMessage."""
    header = header_block(data[: MAX_HEADER + 4])
    if len(header) > MAX_HEADER:
        raise MalformedMessage(f"header larger than {MAX_HEADER // 1024} KiB")
    if not _FIELD_LINE.match(header):
        raise MalformedMessage("message has no header")
    return header


def _envelope(fields: dict[str, list[str]], recipients: tuple[str, ...], size: int, explicit: bool = False) -> Envelope:
    from_address = _first_address(fields.get("from", []))
    return Envelope(
        sender=safe_address(_first_address(fields.get("sender", [])) or from_address),
        recipients=recipients,
        from_address=_printable(from_address),
        to_header=_printable(listed(_addresses(fields.get("to", [])))),
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


def listed(addresses, shown: int = 3, sep: str = ", ") -> str:
    """A few addresses and how many more: what a log line or a sentlog row names."""
    addresses = list(addresses)
    more = f" (+{len(addresses) - shown} more)" if len(addresses) > shown else ""
    return sep.join(addresses[:shown]) + more


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
    try:  # no encoded word ("=?"): nothing to decode, and the email package's answer would be `value`
        text = str(make_header(decode_header(value))) if "=?" in value else value
    except Exception:  # noqa: BLE001 -- a subject that is not RFC 2047 after all (a forum title) stays as it is
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
            except Exception:  # noqa: BLE001 -- any Date: a jail writes
                return None
            return when if when <= now else None
    return None
