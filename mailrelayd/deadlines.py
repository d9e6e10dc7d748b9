"""One thread that ends whatever outlives its deadline: a delivery's process group, or
its SMTP connection.

`watch(seconds, expire)` brackets one delivery; if it is still inside the bracket when
the time is up, `expire()` is called (on the deadline thread, under its lock) and the
bracket's `fired` is set. The thread sleeps until the earliest deadline and is only
woken when a new deadline is earlier still, so a steady stream of deliveries with the
same timeout costs it nothing.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager


class Watch:
    __slots__ = ("expire", "fired")

    def __init__(self, expire: Callable[[], None] | None):
        self.expire, self.fired = expire, False


class Deadlines:
    def __init__(self, name: str = "deadlines"):
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wakes_at = float("inf")  # when the thread next looks at the heap by itself

    @contextmanager
    def watch(self, seconds: float, expire: Callable[[], None]):
        entry = Watch(expire)
        deadline = time.monotonic() + seconds
        with self._cond:
            self._drop_finished()
            heapq.heappush(self._heap, (deadline, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            if deadline < self._wakes_at:
                self._cond.notify()
        try:
            yield entry
        finally:
            with self._cond:
                entry.expire = None  # finished: never act on it (a process group id may be reused)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _drop_finished(self) -> None:
        while self._heap and self._heap[0][2].expire is None:
            heapq.heappop(self._heap)

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                self._drop_finished()
                if not self._heap:
                    self._wakes_at = float("inf")
                    self._cond.wait()
                    continue
                deadline, _, entry = self._heap[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakes_at = deadline
                    self._cond.wait(remaining)
                    continue
                heapq.heappop(self._heap)
                entry.fired = True
                if entry.expire is not None:
                    entry.expire()
