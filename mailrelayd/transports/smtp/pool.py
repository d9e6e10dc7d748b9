"""The connection pool of the SMTP transport, and its idle reaper.

At most `limit` connections are open at once, in use or idle. A thread takes an idle
one (the most recently used), or is told to open one while there is room, or waits.
Idle connections are closed (politely) by a reaper thread once idle for `idle_timeout`;
the reaper starts with the first connection given back and sleeps until the oldest
idle one is due.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    def close(self, quit: bool = False) -> None: ...


C = TypeVar("C", bound=Closable)


class PoolClosed(Exception):
    """The pool is closed: it hands out no connection any more."""


class Pool(Generic[C]):
    """At most `limit` open connections; idle ones kept most-recent-last and reaped."""

    def __init__(self, limit: int, idle_timeout: float):
        self._limit, self._idle_timeout = limit, idle_timeout
        self._cond = threading.Condition()
        self._idle: list[tuple[float, C]] = []  # (idle since, connection), oldest first
        self._open = 0
        self._closed = False
        self._reaper: threading.Thread | None = None

    def take(self) -> C | None:
        """An idle connection, or None when the caller may open a new one; waits for one
        of those while `limit` are in use. Raises PoolClosed once closed."""
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed()
                if self._idle:
                    return self._idle.pop()[1]
                if self._open < self._limit:
                    self._open += 1
                    return None
                self._cond.wait()

    def give_back(self, conn: C) -> None:
        """Keep `conn` (taken or opened) for the next taker; closed at once if the pool is."""
        with self._cond:
            if not self._closed:
                if not self._idle:  # only then may someone be waiting (takers, the reaper)
                    self._cond.notify_all()
                self._idle.append((time.monotonic(), conn))
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="smtp-reaper", daemon=True)
                    self._reaper.start()
                return
            self._open -= 1
        conn.close(quit=True)

    def discard(self, conn: C, quit: bool = False) -> None:
        """Close `conn` (taken or opened) and make room for another."""
        conn.close(quit=quit)
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for _, conn in idle:
            conn.close(quit=True)

    def _reap(self) -> None:
        while True:
            with self._cond:
                expired: list[C] = []
                while not expired:
                    if self._closed:
                        return
                    now = time.monotonic()
                    expired = [c for since, c in self._idle if since + self._idle_timeout <= now]
                    if not expired:
                        self._cond.wait(self._idle[0][0] + self._idle_timeout - now if self._idle else None)
                self._idle = [(since, c) for since, c in self._idle if since + self._idle_timeout > now]
                self._open -= len(expired)
                self._cond.notify_all()
            for conn in expired:
                conn.close(quit=True)
