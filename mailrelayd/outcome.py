"""The result of one delivery attempt: sent, temporary failure or permanent failure.

Transports return one of these; the relay decides from it what happens to the message
(acknowledge, defer for a retry, or set aside for the administrator).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sent:
    """The mail system accepted the message; it may leave the queue."""

    detail: str = ""
    name = "sent"


@dataclass(frozen=True)
class TemporaryFailure:
    """The attempt failed in a way that may pass: keep the message and try again later.

    `setup_error` marks failures of our own set-up (a missing or broken command, an
    unwritable directory) rather than of the message or the remote side: the relay
    reports those loudly, since no retry will help until someone fixes them.
    """

    detail: str
    setup_error: bool = False
    name = "deferred"


@dataclass(frozen=True)
class PermanentFailure:
    """The message itself cannot be delivered: set it aside, with the reason."""

    detail: str
    name = "failed"


@dataclass(frozen=True)
class PartlySent:
    """Some recipients took the message and others did not (SMTP answers per recipient).

    Only the recipients in `temporary` may be tried again; those in `permanent` were
    refused for good; the `accepted` ones must never get the message twice. Each
    failure is (recipient, the server's reply).
    """

    accepted: tuple[str, ...]
    temporary: tuple[tuple[str, str], ...] = ()
    permanent: tuple[tuple[str, str], ...] = ()
    name = "partly sent"


Outcome = Sent | TemporaryFailure | PermanentFailure | PartlySent
