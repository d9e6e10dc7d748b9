"""Queues hold messages until the mail system has taken them.

Every queue follows claim, then acknowledge: `claim` marks due messages as being
delivered by this process (skipping what another process holds) and returns them;
exactly one of `mark_sent`, `defer` or `set_aside` then records what happened, or
`release` hands an unstarted claim back. Nothing leaves a queue on claim. A queue knows
nothing of transports. Methods are called from one thread only.

`stats` counts what waits, cheaply enough for a daemon to call every few seconds; `add`
queues a message of the relay's own (a failure notice to the administrator); `lock_path`
names the file whose lock marks the one relay serving the queue (see mailrelayd.queuelock).

The same interface serves the administrator (`mailrelayd list`, `retry`, ...): `entries`
and `find` show messages as `Entry` values; `make_due`, `requeue` and the `purge_*`
methods change them, under the same safety rules as the relay's own reads and writes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Sequence
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
    `next_try`: the earliest next try of the deferred ones; `refused`: refused unread (a
    spool's corrupt/, SQLite rows over max_size).
    """

    queued: int
    deferred: int
    failed: int
    sent_24h: int | None
    oldest_queued_s: float | None
    next_try: float | None
    refused: int = 0


@dataclass(frozen=True)
class Entry:
    """One message as the administrator sees it; never delivered from.

    `state` is new, deferred, failed or refused (a spool entry moved aside unread). `data`
    is the message as queued, without any injector's envelope, or b"" when it may not be
    read. `sender` and `recipients` are those recorded with the message (by the injector,
    or after a partial send: who is still to get it, or never got it), else None.
    `origin` is the id it had while queued, for a message whose id changed when it was set
    aside. A failed message's `last_try` is its `failed_at`: the try that failed it.
    """

    id: str
    state: str
    data: bytes
    size: int
    sender: str | None = None
    recipients: tuple[str, ...] | None = None
    attempts: int = 0
    first_seen: float | None = None
    last_try: float | None = None
    next_try: float | None = None
    last_error: str | None = None
    reason: str | None = None
    failed_at: float | None = None
    origin: str | None = None


class Queue(Protocol):
    name: str
    watch_dir: Path
    lock_path: Path  # the single-relay lock file (computed, never created by the queue)
    sent_record: str | None  # what it keeps of sent mail ("sentlog rows", "sent messages"), or None
    refused: int  # entries this queue object has refused unread so far

    def open(self, read_only: bool = False) -> None:
        """Open the queue (creating what the relay keeps beside it); `read_only`: only to
        look (stats, entries, find, sent_times), creating and writing nothing, with no
        need for write access; what is missing reads as empty."""
        ...

    def notice(self, kind: str, path: str) -> bool:
        """Called on the watcher's thread for each file event in `watch_dir` (kind:
        created, modified, attrib (most likely a change of metadata alone), closed or
        moved, with the new path); True wakes the relay."""
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

    def sent_times(self, since: float, limit: int) -> list[float]:
        """When the latest (at most `limit`) messages sent since `since` were sent, as far as
        the queue records it (sentlog, kept sent files); [] when it keeps no record."""
        ...

    def interrupt(self) -> None:
        """A stop was asked for: cut short whatever may take long now (safe from another thread)."""
        ...

    def rescan(self) -> None:
        """Forget what the queue keeps in memory of its state (another process changed it)."""
        ...

    def close(self) -> None: ...

    # -- administration -------------------------------------------------------------

    def entries(self, states: Collection[str], now: float) -> list[Entry]:
        """The messages in these states (new, deferred, failed, refused), oldest first."""
        ...

    def find(self, ident: str, now: float) -> Entry | None:
        """The message with this id, in whatever state, or None."""
        ...

    def make_due(self, ids: Sequence[str] | None, now: float) -> list[str]:
        """Deferred messages (these, or all) due now; the ids it changed."""
        ...

    def requeue(self, ids: Sequence[str] | None, now: float) -> list[tuple[str, str]]:
        """Failed messages (these, or all) back in the queue, due now: (old id, new id) each.
        One that reached some recipients before goes back for the others only."""
        ...

    def purge_failed(self, ids: Sequence[str] | None, before: float) -> list[str]:
        """Delete failed messages: these ids, or all set aside before `before`."""
        ...

    def purge_sent(self, before: float) -> list[str]:
        """Delete the record of messages sent before `before` (sentlog rows, kept files)."""
        ...

    def purge_refused(self, before: float) -> list[str]:
        """Delete entries refused before `before` (a spool's corrupt/; nothing elsewhere)."""
        ...


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
