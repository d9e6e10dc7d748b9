"""How many deliveries one queue runs at once: fixed (`workers = N`), or found as it goes
(`workers = "auto"`, the default), as Postfix's per-destination concurrency feedback does.

The adaptive limit starts at START and is judged window by window, each about one round
trip long and only while the relay had work waiting (a limit that is not reached says
nothing of what more would give). It climbs fourfold while the delivery rate does not
fall with a step: a slow mail system, one that waits on the network, reaches max_workers
after one round trip. A step that lowered the rate is tried again at half its height
(twice the last limit), kept there if that does no worse than before the step, else
taken back: a mail system limited by its CPUs or disk settles where more stopped helping.
At the top of the climb, the middle of its last step is kept if it does as well (within
GAIN): fewer deliveries at once cost the mail system less for the same rate. Settled, it
probes a quarter higher now and then, keeping the step only if the rate grows by GAIN.
Temporary failures (timeouts, 4xx, EX_TEMPFAIL) in a window halve it at once, and it
stays low for a cool-down: a failing smarthost is not hammered. It never goes above
`max_workers` or below 1.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

START = 8  # low beside max_workers, yet where a local MTA already runs near its best
MIN_WINDOW = 0.05  # seconds: a window is at least this long...
MIN_DONE = 4  # ...and holds at least this many deliveries (and at least the limit)
STEP = 4  # the climb's factor
GAIN = 1.05  # a probe must raise the rate past this share; a step's middle may be this much slower
FAILING = 0.1  # temporary failures over this share of a window halve the limit
COOL_DOWN = 5.0  # seconds without raising the limit after failures
PROBE_EVERY = 5.0  # seconds between probes once settled


class Concurrency:
    """The limit on deliveries in flight; `done()` after each one, from the relay's thread."""

    def __init__(self, workers: int | str, max_workers: int = 32, clock: Callable[[], float] = time.monotonic,
                 log=None):
        self.adaptive = workers == "auto"
        self.max = max_workers if self.adaptive else int(workers)
        self.limit = min(START, self.max) if self.adaptive else self.max
        self.clock, self.log = clock, log
        self._climbing = True
        self._last: tuple[int, float] | None = None  # (limit, rate) before the climb's last step
        self._middle: tuple[float, int] | None = None  # trying a step's middle: (rate it needs, limit else)
        self._probe: tuple[int, float] | None = None  # (limit before, rate before) while probing
        self._no_rise_until = 0.0
        self._next_probe = 0.0
        self._new_window(clock())

    def done(self, temporary_failure: bool, saturated: bool) -> None:
        """One delivery finished; `saturated`: the limit was reached when it did (work waited)."""
        if not self.adaptive:
            return
        self._done += 1
        self._failed += temporary_failure
        self._saturated += saturated
        now = self.clock()
        if self._done >= max(MIN_DONE, self.limit) and now - self._started >= MIN_WINDOW:
            self._judge(now)

    def _judge(self, now: float) -> None:
        rate = self._done / (now - self._started)
        if self._failed > FAILING * self._done:
            self._set(max(1, self.limit // 2), "temporary failures")
            self._climbing, self._last, self._probe, self._middle = False, None, None, None
            self._no_rise_until = self._next_probe = now + COOL_DOWN
        elif self._saturated * 2 < self._done or now < self._no_rise_until:
            pass  # work did not wait, or cooling down: nothing to learn about more concurrency
        elif self._probe is not None:  # keep a probe's step only if it paid
            before, before_rate = self._probe
            self._probe = None
            if rate < before_rate * GAIN:
                self._set(before, "a probe did not pay")
            self._next_probe = now + PROBE_EVERY
        elif self._climbing:
            self._climb(rate, now)
        elif now >= self._next_probe and self.limit < self.max:
            self._probe = (self.limit, rate)
            self._set(min(self.max, self.limit + max(1, self.limit // 4)), "probing")
        self._new_window(now)

    def _climb(self, rate: float, now: float) -> None:
        """One step of the climb: up STEP-fold while the rate does not fall. A long step is
        then tried at half its height (twice the last limit): kept there if the rate did not
        fall below where the step began (the step lowered it) or came within GAIN of the
        step's (it did not), else taken back; skipped if the step gave more than the middle
        possibly could (a rate grows at most as fast as the concurrency). Either way the
        climb ends there."""
        if self._middle is not None:  # the middle of the last step, tried
            needed, otherwise = self._middle
            self._settle(self.limit if rate >= needed else otherwise, now)
            return
        low, low_rate = self._last if self._last is not None else (self.limit, 0.0)
        long_step = self.limit > 2 * low
        if rate < low_rate and long_step:  # the step lowered the rate
            self._try_middle(low_rate, low, 2 * low)
        elif rate < low_rate:
            self._settle(low, now)
        elif self.limit < self.max:
            self._last = (self.limit, rate)
            self._set(min(self.max, STEP * self.limit), "the rate grew")
        elif long_step and rate < low_rate * 2 * GAIN:  # the middle might do as well
            self._try_middle(rate / GAIN, self.limit, 2 * low)
        else:
            self._settle(self.limit, now)

    def _try_middle(self, needed: float, otherwise: int, middle: int) -> None:
        self._middle = (needed, otherwise)
        self._set(middle, "trying the middle of the step")

    def _settle(self, limit: int, now: float) -> None:
        self._climbing, self._middle = False, None
        self._next_probe = now + PROBE_EVERY
        self._set(limit, "settled")

    def _set(self, limit: int, why: str) -> None:
        if limit != self.limit and self.log is not None:
            level = self.log.info if "failures" in why else self.log.debug
            level("concurrency_changed", concurrency=limit, was=self.limit, why=why)
        self.limit = limit

    def _new_window(self, now: float) -> None:
        self._started, self._done, self._failed, self._saturated = now, 0, 0, 0


class Gate:
    """Lets at most `limit` deliveries run at once among the worker threads (more may be
    claimed and waiting, so that a worker never waits for the relay's thread); the limit
    may change at any time. A thread that leaves hands its place straight to the longest
    waiting one: one plain lock per pass, no condition variable to notify."""

    def __init__(self, limit: int):
        self._lock = threading.Lock()
        self._limit, self._running = limit, 0
        self._waiting: deque[threading.Lock] = deque()  # each held until its thread may run

    def set_limit(self, limit: int) -> None:
        if limit == self._limit:
            return
        with self._lock:
            self._limit = limit
            while self._waiting and self._running < self._limit:
                self._running += 1
                self._waiting.popleft().release()

    def __enter__(self) -> Gate:
        with self._lock:
            if self._running < self._limit:
                self._running += 1
                return self
            waiter = threading.Lock()
            waiter.acquire()
            self._waiting.append(waiter)
        waiter.acquire()  # released by a thread that handed this one its place (already counted)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            if self._waiting and self._running <= self._limit:
                self._waiting.popleft().release()  # the place goes on: _running stays
            else:
                self._running -= 1
