"""How much one queue may send: a sliding window of `rate_limit` messages per period.

A jail whose queue is over its rate waits: its messages stay queued, untouched (no
attempt counted, never failed), and go out as the window frees. The window is seeded
from what the queue records of mail sent (sentlog rows, kept sent files), so a drain run
from cron every few minutes keeps to the same rate as a daemon.
"""

from __future__ import annotations

from collections import deque

from mailrelayd.values import Rate


class RateWindow:
    """Send times within the last `rate.period` seconds; `room` is what may go now."""

    def __init__(self, rate: Rate | None, sent: list[float] = ()):  # type: ignore[assignment]
        self.rate = rate
        self._sent: deque[float] = deque(sorted(sent)[-rate.count:] if rate else ())

    def room(self, now: float, in_flight: int) -> int | None:
        """How many more messages may be claimed now (None: no limit)."""
        if self.rate is None:
            return None
        self._expire(now)
        return max(0, self.rate.count - len(self._sent) - in_flight)

    def sent(self, now: float, count: int = 1) -> None:
        if self.rate is not None:
            self._sent.extend([now] * count)
            self._expire(now)

    def frees_at(self, now: float) -> float | None:
        """When the next message may go, if none may now; else None."""
        if self.rate is None or self.room(now, 0):
            return None
        return self._sent[0] + self.rate.period

    def _expire(self, now: float) -> None:
        assert self.rate is not None
        while self._sent and (self._sent[0] <= now - self.rate.period or len(self._sent) > self.rate.count):
            self._sent.popleft()
