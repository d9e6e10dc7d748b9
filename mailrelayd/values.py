"""Configuration values: how one key is declared (Option), and the parsers of its value.

A parser takes a TOML value or a flag's string and returns the checked value, or raises
ValueError saying what is expected (config.py adds the key and where it came from).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Option:
    """One setting: its TOML key (the flag is --key-with-dashes), parser, metavar and help."""

    key: str
    parse: Callable[[Any], Any]
    metavar: str  # "" for a flag that takes no value
    help: str


# -- the parsers -----------------------------------------------------------------------


def path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a path")
    return Path(value)


def command(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError("expected a command line such as '/usr/sbin/sendmail -ti'")
    try:
        argv = tuple(shlex.split(value))
    except ValueError as e:
        raise ValueError(f"cannot split it like a shell would: {e}") from None
    if not argv:
        raise ValueError("expected a command line such as '/usr/sbin/sendmail -ti'")
    return argv


def int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)):
            seconds = float(m[1]) * _UNITS[m[2]]
        else:
            raise ValueError("expected a duration such as 30, 30s, 5m, 1h or 5d")
        if not minimum <= seconds <= 10 * 365 * 86400:
            raise ValueError(f"expected a duration of at least {minimum:g} s")
        return seconds

    return parse


def exit_codes(value: Any) -> frozenset[int]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of exit statuses such as 65,67")
    parse = int_range(1, 255)
    try:
        codes = frozenset(parse(v.strip() if isinstance(v, str) else v) for v in items if v != "")
    except ValueError:
        raise ValueError("expected a list of exit statuses from 1 to 255, such as 65,67") from None
    if 75 in codes:
        raise ValueError("75 (EX_TEMPFAIL) always means try again later")
    return codes


def envelope_from(value: Any) -> str:
    from mailrelayd.message import safe_address

    if value in ("header", "none") or (isinstance(value, str) and safe_address(value)):
        return value
    raise ValueError("expected 'header', 'none' or an address such as noreply@example.org")


def size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", value, re.IGNORECASE)):
        size = int(m[1]) * 1024 ** " KMG".index(m[2].upper() or " ")
        if size > 0:
            return size
    raise ValueError("expected a size such as 25M, 512K or 1000000")


@dataclass(frozen=True)
class Rate:
    """At most `count` messages in any `period` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            if self.period % seconds == 0:
                n = int(self.period // seconds)
                return f"{self.count}/{n if n != 1 else ''}{unit}"
        return f"{self.count}/{self.period:g}s"


def rate(value: Any) -> Rate | None:
    """N/PERIOD (600/h, 100/10m, 5/1s), or none."""
    if isinstance(value, str) and value.strip().lower() in ("none", "off"):
        return None
    count, slash, period = value.partition("/") if isinstance(value, str) else ("", "", "")
    try:
        number = int_range(1, 10**9)(count)
        seconds = duration(1)(period if period[:1].isdigit() else f"1{period}")
    except ValueError:
        raise ValueError("expected a rate such as 600/h, 100/10m or none") from None
    if not slash:
        raise ValueError("expected a rate such as 600/h, 100/10m or none")
    return Rate(number, seconds)


def workers(value: Any) -> int | str:
    """A number of deliveries at once (1 to 256), or "auto"."""
    if value == "auto":
        return value
    try:
        return int_range(1, 256)(value)
    except ValueError:
        raise ValueError("expected auto or a whole number from 1 to 256") from None


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError("expected true or false")


def user(value: Any) -> int:
    import pwd

    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except (KeyError, TypeError):
        raise ValueError("expected a user name or uid that exists on this host") from None


def account(value: Any) -> str:
    """A user to run as (a name or uid in the user database, never root): its name."""
    import pwd

    try:
        if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit()):
            entry = pwd.getpwuid(int(value))
        elif isinstance(value, str) and value:
            entry = pwd.getpwnam(value)
        else:
            raise KeyError(value)
    except (KeyError, ValueError, OverflowError):
        raise ValueError("expected a user name or uid that exists on this host") from None
    if entry.pw_uid == 0:
        raise ValueError("mailrelayd never switches to root; to relay as root, set allow_root = true"
                         " (--allow-root) instead")
    return entry.pw_name


def host(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,253}", value) and not value.startswith("-"):
        return value
    raise ValueError("expected a host name or address")


def address(value: Any) -> str:
    from mailrelayd.message import safe_address

    if isinstance(value, str) and safe_address(value):
        return value
    raise ValueError("expected a plain address such as noreply@example.org")


def addresses(value: Any) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of addresses")
    return tuple(address(v) for v in items if v)


def domain(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", value):
        return value
    raise ValueError("expected a domain such as example.org")


def text(value: Any) -> str:
    if isinstance(value, str) and value and value.isprintable() and not value.startswith("-"):
        return value
    raise ValueError("expected a word")


def listen(value: Any) -> str:
    from mailrelayd.metrics import parse_listen

    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT such as 127.0.0.1:9464")
    parse_listen(value)
    return value


def choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse
