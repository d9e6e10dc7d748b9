"""Transports hand one message to the mail system and say how it went.

A transport knows nothing of queues: it gets the message bytes and its Envelope and
returns an Outcome. `deliver` may be called from several threads at once.
"""

from __future__ import annotations

from typing import Protocol

from mailrelayd.message import Envelope
from mailrelayd.outcome import Outcome


class Transport(Protocol):
    def deliver(self, data: bytes, envelope: Envelope) -> Outcome: ...

    def close(self) -> None: ...
