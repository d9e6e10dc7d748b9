"""What a supervisor and the relays it runs share: what it asks of each (Supervision),
and what each tells it (RelayStatus, a snapshot another thread may read at any time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailrelayd.queues import QueueStats

if TYPE_CHECKING:  # watchdog is imported only by what watches (a drain does not)
    from mailrelayd.watch import Watcher


@dataclass(frozen=True)
class RelayStatus:
    """A relay as another thread may see it: `state` is starting, waiting (for its queue),
    running or stopped; `heartbeat` the monotonic time of its loop's last turn."""

    state: str = "starting"
    heartbeat: float = field(default_factory=time.monotonic)
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    stats: QueueStats | None = None
    problem: str | None = None  # why the queue is unavailable, while it is
    limited: bool = False  # at its rate_limit: messages wait
    concurrency: int = 0  # deliveries it lets run at once now


@dataclass(frozen=True)
class Supervision:
    """What a supervisor asks of a relay it runs: a turn at least every `max_sleep`
    seconds, queue stats every `stats_every`, `observer(queue, outcome, seconds)` per
    attempt (metrics), `on_status()` when the state changes, and its shared Watcher."""

    max_sleep: float | None = None
    stats_every: float | None = None
    observer: Callable[[str, str, float], None] | None = None
    on_status: Callable[[], None] | None = None
    watcher: Watcher | None = None
