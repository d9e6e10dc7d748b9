"""One delivery attempt, on a worker thread: read the envelope, apply the per-message
limits, hand the message to the transport. Whatever happens becomes an Attempt with a
typed Outcome; nothing here raises for a message, nothing touches the queue."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from mailrelayd.message import Envelope, MalformedMessage, explicit_envelope, read_envelope
from mailrelayd.outcome import Outcome, PermanentFailure, TemporaryFailure
from mailrelayd.queues import QueuedMessage
from mailrelayd.transports import Transport


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt: the message, the envelope it went with, what came of it, and
    how long it took (ms)."""

    msg: QueuedMessage
    envelope: Envelope | None
    outcome: Outcome
    ms: float


def attempt(msg: QueuedMessage, transport: Transport, *, envelope_from: str = "header",
            max_recipients: int = 100) -> Attempt:
    """Deliver `msg` once. `envelope_from`: header, none, or a fixed sender. A message that
    cannot be read as one (MalformedMessage) or is for more than `max_recipients` is a
    permanent failure, never handed on."""
    started = time.perf_counter()
    try:
        envelope = envelope_of(msg.data, msg.envelope, envelope_from=envelope_from, partial=msg.partial)
    except MalformedMessage as e:
        return Attempt(msg, None, PermanentFailure(str(e)), 0.0)
    if len(envelope.recipients) > max_recipients:
        return Attempt(msg, envelope, PermanentFailure(
            f"{len(envelope.recipients)} recipients, over max_recipients ({max_recipients})"), 0.0)
    try:
        outcome = transport.deliver(msg.data, envelope)
    except Exception as e:  # noqa: BLE001 -- a transport bug must never lose the message
        outcome = TemporaryFailure(f"internal error in transport: {e!r}", setup_error=True)
    return Attempt(msg, envelope, outcome, (time.perf_counter() - started) * 1000)


def envelope_of(data: bytes, recorded: tuple[str, tuple[str, ...]] | None, *, envelope_from: str = "header",
                partial: bool = False) -> Envelope:
    """The envelope a delivery of `data` goes with: the `recorded` (sender, recipients), else
    the header's; the sender as `envelope_from` says (header: the message's own; none: no
    sender passed on, None; else that address). MalformedMessage if there is none. `show`
    and `list` print it too, so that they say what a delivery uses."""
    if recorded:
        envelope = replace(explicit_envelope(data, *recorded), remaining=partial)
    else:
        envelope = read_envelope(data)
    if envelope_from != "header":
        envelope = replace(envelope, sender=None if envelope_from == "none" else envelope_from)
    return envelope
