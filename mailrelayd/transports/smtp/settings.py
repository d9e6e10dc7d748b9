"""The SMTP settings, declared once.

Each field of SmtpSettings is one configuration key: its metadata holds the Option (TOML
key, flag, parser, metavar, help) that config.py offers, and the field's default is the
key's. A Config always holds one SmtpSettings (the defaults when no SMTP key is given);
SMTP is the way to deliver when `server` is set. `check` refuses what cannot work, once,
when the transport is built. The password is never a setting: `read_password` reads it
from `password_file`, when the transport is built.

Cheap to import (config.py does): no ssl, no smtplib.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mailrelayd import values
from mailrelayd.inject import is_plain_address
from mailrelayd.values import Option

TLS_MODES = ("starttls", "implicit", "none")


class SmtpSettingsError(ValueError):
    """The settings cannot work (raised when the transport is built, not per message)."""


def _key(key: str, parse: Callable[[Any], Any], metavar: str, help: str) -> dict[str, Option]:
    """A field's metadata: the field is the configuration key `key`."""
    return {"option": Option(key, parse, metavar, help)}


@dataclass(frozen=True)
class SmtpSettings:
    """How to reach the smarthost and what to send it; each field is one configuration key."""

    server: str | None = field(default=None, metadata=_key(
        "smtp_server", values.host, "HOST", "send to this SMTP server (smarthost) instead of running a command"))
    port: int = field(default=25, metadata=_key(
        "smtp_port", values.int_range(1, 65535), "PORT", "the SMTP server's port (default: 25)"))
    use_tls: str | None = field(default=None, metadata=_key(  # None: see `tls`
        "use_tls", values.choice(*TLS_MODES), "MODE", "starttls, implicit or none"
        " (default: implicit on port 465, else starttls)"))
    ca_file: Path | None = field(default=None, metadata=_key(  # a private CA, trusted besides the system's
        "smtp_ca_file", values.path, "FILE", "CA certificates (PEM) to verify the SMTP server with"))
    insecure: bool = field(default=False, metadata=_key(
        "smtp_insecure", values.boolean, "", "do not verify the SMTP server's certificate (unsafe)"))
    user: str | None = field(default=None, metadata=_key(
        "smtp_user", values.text, "USER", "log in to the SMTP server as this user"))
    password_file: Path | None = field(default=None, metadata=_key(
        "smtp_password_file", values.path, "FILE", "file holding the SMTP password (never a flag or TOML value)"))
    allow_plaintext_auth: bool = field(default=False, metadata=_key(
        "smtp_allow_plaintext_auth", values.boolean, "", "allow logging in without TLS"))
    envelope_from: str | None = field(default=None, metadata=_key(  # a fixed MAIL FROM
        "smtp_from", values.address, "ADDR", "fixed SMTP envelope sender (default: as envelope_from)"))
    default_domain: str | None = field(default=None, metadata=_key(
        "smtp_default_domain", values.domain, "DOMAIN", "append @DOMAIN to recipients without a domain"))
    use_short_addr: bool = field(default=False, metadata=_key(
        "use_short_addr", values.boolean, "", "send recipients without a domain unchanged"))
    always_bcc: tuple[str, ...] = field(default=(), metadata=_key(
        "smtp_always_bcc", values.addresses, "LIST", "extra recipients of every message, never in its headers"))
    helo: str | None = field(default=None, metadata=_key(  # None: socket.getfqdn()
        "smtp_helo", values.host, "NAME", "name to give in EHLO (default: this host's)"))
    max_messages: int = field(default=100, metadata=_key(
        "smtp_max_messages", values.int_range(1, 100000), "N", "messages per SMTP connection (default: 100)"))
    idle_timeout: float = field(default=30.0, metadata=_key(
        "smtp_idle_timeout", values.duration(0.1), "DURATION", "close SMTP connections idle this long"
        " (default: 30s)"))
    connect_timeout: float = field(default=30.0, metadata=_key(
        "smtp_connect_timeout", values.duration(0.1), "DURATION", "give up connecting after (default: 30s)"))
    reply_timeout: float = field(default=60.0, metadata=_key(
        "smtp_reply_timeout", values.duration(0.1), "DURATION", "give up waiting for a reply after (default: 60s)"))

    @classmethod
    def from_keys(cls, given: dict[str, Any]) -> SmtpSettings:
        """The settings from parsed values by configuration key (any other key is left alone)."""
        return cls(**{f.name: given[key] for f, key in _KEYS if key in given})

    def items(self) -> list[tuple[str, Any]]:
        """(configuration key, value) of every field, in declaration order."""
        return [(key, getattr(self, f.name)) for f, key in _KEYS]

    @property
    def tls(self) -> str:
        """The TLS mode in effect: use_tls, else implicit on port 465 and starttls elsewhere."""
        return self.use_tls or ("implicit" if self.port == 465 else "starttls")

    def check(self, password: str | None) -> None:
        """Raise SmtpSettingsError, with one line, if these settings (and this password) cannot work."""
        if self.use_tls is not None and self.use_tls not in TLS_MODES:
            raise SmtpSettingsError(f"use_tls must be one of {', '.join(TLS_MODES)}, not {self.use_tls!r}")
        if self.max_messages < 1:
            raise SmtpSettingsError("max_messages must be at least 1")
        for name in ("idle_timeout", "connect_timeout", "reply_timeout"):
            if not getattr(self, name) > 0:
                raise SmtpSettingsError(f"{name} must be more than 0 seconds")
        if self.user is not None and password is None:
            raise SmtpSettingsError("smtp_user is set but there is no password (smtp_password_file)")
        for name, address in [("smtp_from", self.envelope_from), *(("smtp_always_bcc", a) for a in self.always_bcc)]:
            problem = address_problem(address) if address else None
            if problem:
                raise SmtpSettingsError(f"{name} {address!r}: {problem}")

    def read_password(self) -> str | None:
        """The password: password_file's text without trailing line endings (None without a file)."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().rstrip("\r\n")
        except OSError as e:
            raise SmtpSettingsError(f"cannot read smtp_password_file {self.password_file}: {e.strerror}") from None


_KEYS = [(f, f.metadata["option"].key) for f in fields(SmtpSettings)]
OPTIONS: list[Option] = [f.metadata["option"] for f in fields(SmtpSettings)]


def address_problem(address: str) -> str | None:
    """Why `address` cannot go in MAIL FROM or RCPT TO as it is, or None if it can: the one
    plain-address rule (mailrelayd.inject.is_plain_address); a bare local name only gets
    here with use_short_addr."""
    if is_plain_address(address):
        return None
    return "it is not a plain address (local@domain, with no spaces, quotes, brackets or control characters)"
