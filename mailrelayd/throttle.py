"""Say a repeated event in full a few times, then as a count: a flood of hostile entries
(refused files, repaired state) must not flood the log, yet nothing goes unsaid."""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """Logs `event` in full at most `burst` times a `period`; the rest of the period's
    occurrences become one line with `count` (and `note`), said when the next period
    starts or at `flush()`."""

    def __init__(self, log, event: str, *, burst: int = 10, period: float = 60.0, level: str = "warning",
                 clock: Callable[[], float] = time.monotonic, **context):
        self.log, self.event, self.burst, self.period, self.level, self.clock = log, event, burst, period, level, clock
        self.context = context  # said with every line
        self._window_end = float("-inf")
        self._said = self._held = 0

    def __call__(self, **context) -> None:
        self.flush()
        if self._said < self.burst:
            self._said += 1
            getattr(self.log, self.level)(self.event, **self.context, **context)
        else:
            self._held += 1

    def flush(self, force: bool = False) -> None:
        """Say the count held back once its period is over (or now, with `force`)."""
        now = self.clock()
        if now < self._window_end and not force:
            return
        if self._held:
            getattr(self.log, self.level)(self.event, **{**self.context, "count": self._held,
                                          "note": f"{self._held} more like this, not logged one by one"})
        self._window_end, self._said, self._held = now + self.period, 0, 0
