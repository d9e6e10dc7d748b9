"""A queue's own records, read back: checked once, here, where they enter.

A jail owns `emailqueue.db`, mailrelayd's tables in it included, so what mailrelayd wrote
there may have been rewritten: a text where a count was, JSON that is not a list, an
address that is a command. Whatever is read back of a message's history is checked
here; a value that fails is not used, and the message starts afresh (no attempts, first
seen now, every recipient), which is the worst a jail can make of it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from mailrelayd.inject import is_plain_address

MAX_ATTEMPTS = 1_000_000
MAX_RECIPIENTS = 100_000


@dataclass(frozen=True)
class History:
    """How a message has fared so far: `recipients` after a partial send are those still
    to get it (None: every recipient)."""

    attempts: int = 0
    first_seen: float = 0.0
    recipients: tuple[str, ...] | None = None


def history(attempts, first_seen, recipients, now: float) -> tuple[History, str | None]:
    """The history recorded for a message, and None; or, if any value fails its check, a
    fresh history (first seen `now`) and what was wrong. `recipients` is a JSON list as
    text, or the list itself."""
    problem = _problem(attempts, first_seen, recipients, now)
    if problem is not None:
        return History(0, now, None), problem
    return History(int(attempts), float(first_seen), address_list(recipients)), None


def address_list(value) -> tuple[str, ...] | None:
    """A recorded list of recipients (JSON text or a list) if every item is a plain
    address; None for none recorded. ValueError for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("recipients are not JSON") from None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_RECIPIENTS:
        raise ValueError("recipients are not a list of addresses")
    if not all(isinstance(a, str) and is_plain_address(a) for a in value):
        raise ValueError("a recorded recipient is not a plain address")
    return tuple(value)


def number(value, default: float | None = None) -> float | None:
    """A finite number (not a bool), else `default`."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def _problem(attempts, first_seen, recipients, now: float) -> str | None:
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 0 <= attempts <= MAX_ATTEMPTS:
        return f"attempts is {_shown(attempts)}"
    seen = number(first_seen)
    if seen is None or not 0 < seen <= now + 86400:
        return f"first_seen is {_shown(first_seen)}"
    try:
        address_list(recipients)
    except ValueError as e:
        return str(e)
    return None


def _shown(value) -> str:
    return f"{type(value).__name__} {value!r}"[:60]


def digest(data: bytes) -> bytes:
    """What a record keeps of its message's body: a reused id does not inherit the record."""
    return hashlib.blake2b(data, digest_size=16).digest()


def to_json(recipients: tuple[str, ...] | None) -> str | None:
    """Recipients as a record keeps them (a JSON list), None for every recipient."""
    return json.dumps(list(recipients)) if recipients is not None else None
