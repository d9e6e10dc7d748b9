"""Queues hold messages until the mail system has taken them.

Every queue follows claim, then acknowledge: `claim` marks due messages as being
delivered by this process (skipping what another process holds) and returns them;
exactly one of `mark_sent`, `defer` or `set_aside` then records what happened, or
`release` hands an unstarted claim back. Nothing leaves a queue on claim. A queue knows
nothing of transports. Methods are called from one thread only.

`stats` counts what waits, cheaply enough for a daemon to call every few seconds; `add`
queues a message of the relay's own (a failure notice to the administrator); `lock_path`
names the file whose lock marks the one relay serving the queue (see mailrelayd.queuelock).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mailrelayd.message import Envelope


class QueueError(Exception):
    """The queue cannot be opened, read or written right now; the message says why.

    `permanent` marks a set-up that cannot come right by waiting (the spool's state on
    another file system): a daemon gives up instead of retrying.
    """

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class QueuedMessage:
    """One claimed message: its id in its queue, its bytes, and its delivery history.

    `envelope` is (sender, recipients) when they were recorded beside the message (by
    mailrelayd-sendmail, or after a partial send: then `partial`); exactly those
    recipients get it, whatever its header says.
    """

    id: int | str
    data: bytes
    attempts: int
    first_seen: float
    envelope: tuple[str, tuple[str, ...]] | None = None
    partial: bool = False


@dataclass(frozen=True)
class QueueStats:
    """What a queue holds now: counts, and times as unix time or ages in seconds.

    `queued`: due or new (not failed); `deferred`: waiting for a later try; `failed`: set
    aside; `sent_24h`: sent in the last day, None when the queue keeps no record of it;
    `oldest_queued_s`: age of the oldest message still to send (queued or deferred);
    `next_try`: the earliest next try of the deferred ones.
    """

    queued: int
    deferred: int
    failed: int
    sent_24h: int | None
    oldest_queued_s: float | None
    next_try: float | None


class Queue(Protocol):
    name: str
    watch_dir: Path
    lock_path: Path  # the single-relay lock file (computed, never created by the queue)

    def open(self) -> None: ...

    def notice(self, kind: str, path: str) -> bool:
        """Called on the watcher's thread for each file event in `watch_dir` (kind:
        created, modified, closed or moved, with the new path); True wakes the relay."""
        ...

    def claim(self, now: float, limit: int) -> list[QueuedMessage]: ...

    def add(self, data: bytes, now: float) -> str:
        """Queue one complete message of our own durably, due at once; return its id."""
        ...

    def stats(self, now: float) -> QueueStats:
        """Count the queue without reading bodies or taking the write lock."""
        ...

    def mark_sent(self, sent: list[tuple[QueuedMessage, Envelope | None]], now: float) -> None:
        """The mail system took these: they leave the queue (together, when the queue can)."""
        ...

    def defer(self, msg: QueuedMessage, error: str, next_try: float, now: float,
              recipients: tuple[str, ...] | None = None) -> None:
        """Keep the message for a later try; with `recipients`, only those get it then
        (the others already did)."""
        ...

    def set_aside(self, msg: QueuedMessage, reason: str, now: float,
                  recipients: tuple[str, ...] | None = None) -> None:
        """Keep the message for the administrator; `recipients`: those it never reached."""
        ...

    def release(self, msgs: list[QueuedMessage]) -> None: ...

    def next_due(self, now: float) -> float | None: ...

    def settles_at(self, now: float) -> float | None:
        """When messages still being written (not yet claimable) will be, or None."""
        ...

    def maintain(self, now: float) -> None: ...

    def close(self) -> None: ...


def owner_token(pid: int | None = None) -> str:
    """Names a claiming process so that its claims can be taken back once it is gone."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def owner_is_gone(owner: str) -> bool:
    """True when `owner` names a process on this host that no longer exists.

    The process start time in the token tells a reused pid from the original one.
    Claims by other hosts are never judged gone; their lease must run out.
    """
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    now_start = _start_time(int(pid))
    return now_start == "gone" or now_start != start


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rpartition(")")[2].split()[19]
