"""Delivery over SMTP to a smarthost, in parts:

- settings.py: SmtpSettings, the one declaration of the SMTP configuration keys;
- session.py: one connection and the protocol's dialogue (greeting, EHLO, STARTTLS,
  AUTH, one mail transaction with PIPELINING);
- wire.py: reading replies, and the message's DATA section;
- pool.py: the connection pool and its idle reaper;
- transport.py: SmtpTransport (deliver, close): outcomes by reply code, no password in them.

SmtpTransport is imported only when asked for: config.py imports the settings, and
they stay free of ssl and smtplib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailrelayd.transports.smtp.settings import SmtpSettings, SmtpSettingsError

if TYPE_CHECKING:
    from mailrelayd.transports.smtp.transport import SmtpTransport

__all__ = ["SmtpSettings", "SmtpSettingsError", "SmtpTransport"]


def __getattr__(name: str) -> Any:
    if name == "SmtpTransport":
        from mailrelayd.transports.smtp.transport import SmtpTransport

        return SmtpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
