"""The relay: claim due messages from one queue, deliver them concurrently, record outcomes.

One loop (`_relay`) serves both ways to run: `drain` delivers what is due and returns;
`run`, the daemon, goes on until `stop()`, woken by file events, `wake()` and a poll
timer. They differ only in their pace: how long to wait when there is nothing to do, and
what to do meanwhile (the daemon's chores: maintenance and stats). Queue access stays on
the relay's own thread; only transports run on the worker threads. Another thread sees
the relay only through `status()`, a snapshot.
"""

from __future__ import annotations

import math
import os
import queue as stdqueue
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from mailrelayd.attempt import Attempt, attempt
from mailrelayd.concurrency import Concurrency, Gate
from mailrelayd.limits import RateWindow
from mailrelayd.log import get_logger
from mailrelayd.outcome import PartlySent, TemporaryFailure
from mailrelayd.queues import Queue, QueuedMessage, QueueError
from mailrelayd.recorder import DrainReport, Recorder, RetryPolicy
from mailrelayd.supervision import RelayStatus, Supervision
from mailrelayd.transports import Transport
from mailrelayd.values import Rate

MAINTAIN_EVERY = 3600.0
# A file event can arrive before the change is visible: SQLite writes the WAL frames
# (the event) and only then publishes the commit in the WAL index (no event). So every
# wake-up is followed by a second scan this long after the last event.
RESCAN_AFTER = 0.05
# Deliveries that finish within this long of each other are recorded together: one
# statement, one short write lock, for all of them.
RECORD_EVERY = 0.005
# A drain waits this long at most, in all, for files still being written to settle.
DRAIN_SETTLE_WAIT = 60.0


_WAKE, _SCAN = object(), object()


class Relay:
    def __init__(self, queue: Queue, transport: Transport, *, workers: int | str = 4, max_workers: int = 32,
                 retry: RetryPolicy = RetryPolicy(),
                 poll_interval: float = 10.0, envelope_from: str = "header", clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, notify_failed: str | None = None, max_recipients: int = 100,
                 rate_limit: Rate | None = None, supervision: Supervision = Supervision()):
        self.queue = queue
        self.transport = transport
        self.poll_interval = poll_interval
        self.envelope_from = envelope_from
        self.clock = clock
        self.max_recipients = max_recipients
        self.rate_limit = rate_limit
        self.supervision = supervision
        self.log = get_logger(queue=queue.name)
        self.concurrency = Concurrency(workers, max_workers, log=self.log)
        self._gate = Gate(self.concurrency.limit)
        self._recorder = Recorder(queue, self.log, retry=retry, clock=clock, rng=rng or random.Random(),
                                  notify_failed=notify_failed, observer=supervision.observer)
        self._events: stdqueue.SimpleQueue = stdqueue.SimpleQueue()
        self._wake_posted = False
        self._stopping = False
        self._status = RelayStatus()
        self._look = True  # claim at the next turn
        self._backlog = False  # the last claim took all it asked for: there is more
        self._rescan_at: float | None = None  # monotonic time of the scan that follows a wake-up
        self._unsaid: list[Attempt] = []  # finished, to be recorded with the next batch
        self._recorded_at = 0.0
        self._rate = RateWindow(None)  # seeded from the queue's record of sent mail once it is open
        self._claim_after = 0.0  # monotonic: after a queue error, no claim before this
        self._error_backoff = 0.0

    # -- from any thread (signal handlers too): set a flag, post a token ------------------

    def wake(self) -> None:
        """Look for due messages now (a file event, SIGUSR1)."""
        if not self._wake_posted:
            self._wake_posted = True
            self._events.put(_WAKE)

    def scan(self) -> None:
        """Read the queue's state again, then look (an administrator changed it)."""
        self._events.put(_SCAN)

    def stop(self) -> None:
        """Take no new work; `run` or `drain` returns once in-flight deliveries are done."""
        self._stopping = True
        self.queue.interrupt()
        self._events.put(_WAKE)

    def status(self) -> RelayStatus:
        return self._status

    # -- the two ways to run ------------------------------------------------------------

    def drain(self, progress: Callable[[DrainReport], None] | None = None) -> DrainReport:
        """Deliver every message that is due now, then return what happened.

        `progress(report)` is called after each recorded outcome (a progress bar)."""
        report = self._recorder.report = DrainReport()
        self._look = True
        try:
            self.queue.open()
        except QueueError as e:
            report.queue_error = str(e)
            return report
        self._maintain()
        self._seed_rate()
        self._recorder.progress = progress
        started, refused = time.monotonic(), self.queue.refused

        def pace(busy: bool) -> float | None:  # wake for completions, and for files still being written
            settles = None if report.queue_error else self._settle_wait(started)
            if busy:
                return math.inf if settles is None else settles
            return settles

        self._relay(pace)
        report.refused = self.queue.refused - refused
        if self._status.limited and self.queue.stats(self.clock()).queued:
            report.rate_limited = True
        return report

    def pending(self) -> int | None:
        """Messages waiting to be sent now (a drain's total), or None if unknown."""
        try:
            self.queue.open()
            return self.queue.stats(self.clock()).queued
        except QueueError:
            return None

    def run(self) -> int:
        """Relay until `stop()`; the exit status: 0, or 66 when the queue's set-up can never work."""
        from mailrelayd.watch import Watcher  # watchdog: only for a daemon

        watcher = self.supervision.watcher or Watcher()
        watch = watcher.watch(self.queue.watch_dir, self.queue.notice, self.wake)
        try:
            if self._open_when_ready(watch):
                self.log.info("relay_started", workers="auto" if self.concurrency.adaptive else self.concurrency.limit,
                              file_events=watch.running)
                self._publish(state="running", problem=None)
                self._maintain()
                self._seed_rate()
                chores = _Chores(self, watch)
                self._relay(chores.pace)
            elif not self._stopping:
                return os.EX_NOINPUT
            return os.EX_OK
        finally:
            watch.stop()
            if self.supervision.watcher is None:
                watcher.close()
            self.queue.close()
            self._publish(state="stopped")
            self.log.info("relay_stopped")

    def _open_when_ready(self, watch) -> bool:
        """Open the queue, waiting for it (say, Fossil's first alert); False when stopped,
        or when the set-up can never work."""
        said_events = said_queue = None  # each problem is logged once, not at every retry
        while not self._stopping:
            self._publish()
            why = watch.start()
            if why and why != said_events:
                self.log.warning("file_events_unavailable", reason=why, poll_interval_s=self.poll_interval)
                said_events = why
            try:
                self.queue.open()
                return True
            except QueueError as e:
                self._publish(state="waiting", problem=str(e))
                if e.permanent:
                    self.log.critical("queue_unavailable", error=str(e), note="this cannot come right by waiting")
                    return False
                if str(e) != said_queue:
                    self.log.error("queue_unavailable", error=str(e), retry_in_s=self.poll_interval)
                    said_queue = str(e)
                self._next_event(min(self.poll_interval, self.supervision.max_sleep or math.inf))
        return False

    # -- the loop: claim, deliver, record ------------------------------------------------

    def _relay(self, pace: Callable[[bool], float | None]) -> None:
        """Claim, deliver and record until `pace(busy)` says the work is done (None) or
        `stop()` is called; `pace` also says how long to wait for the next event."""
        inflight: dict[Future, QueuedMessage] = {}
        with ThreadPoolExecutor(self.concurrency.max, thread_name_prefix="deliver") as pool:
            while not self._stopping:
                self._publish()
                limit = self.concurrency.limit
                if self._look and len(inflight) <= limit:  # claimed: at most twice what may run at once
                    # finished but not yet recorded counts against the rate limit as in flight
                    for msg in self._claim(2 * limit - len(inflight), len(inflight) + len(self._unsaid)):
                        future = pool.submit(self._attempt, msg)
                        inflight[future] = msg
                        future.add_done_callback(self._events.put)
                wait = pace(bool(inflight) or bool(self._unsaid))
                if wait is None:
                    break
                if self._unsaid:  # record what finished once RECORD_EVERY has passed
                    wait = max(0.0, min(wait, self._recorded_at + RECORD_EVERY - time.monotonic()))
                self._unsaid += self._await(wait, inflight)
                if not inflight or time.monotonic() >= self._recorded_at + RECORD_EVERY:
                    self._record()
            for future in list(inflight):  # stopping: what has not started goes back
                if future.cancel():
                    self._release([inflight.pop(future)])
            while inflight:
                self._unsaid += self._await(math.inf, inflight)
        self._record()
        self._recorder.record([], final=True)

    def _attempt(self, msg: QueuedMessage) -> Attempt:
        """One delivery, on a worker thread, once the gate lets it run."""
        with self._gate:
            return attempt(msg, self.transport, envelope_from=self.envelope_from, max_recipients=self.max_recipients)

    def _record(self) -> None:
        """Record what finished since the last time (the sent ones in one statement)."""
        attempts, self._unsaid, self._recorded_at = self._unsaid, [], time.monotonic()
        sent = self._recorder.report.sent
        self._recorder.record(attempts)
        self._rate.sent(self.clock(), self._recorder.report.sent - sent)
        if self._recorder.noticed:  # a failure notice was queued: a drain sends it too
            self._recorder.noticed, self._look = False, True

    def _claim(self, room: int, in_flight: int) -> list[QueuedMessage]:
        """Claim up to `room` due messages, within the rate limit; after a queue error,
        nothing for a while (1 s doubling to a minute)."""
        self._look = False
        now = self.clock()
        if time.monotonic() < self._claim_after:
            return []
        allowed = self._rate.room(now, in_flight)
        if allowed is not None and allowed <= 0:  # the window is full: what is due waits
            if not self._status.limited and not in_flight:
                frees = self._rate.frees_at(now)
                self.log.warning("rate_limited", rate_limit=str(self.rate_limit),
                                 frees_in_s=None if frees is None else round(frees - now),
                                 note="messages wait, untouched, until the window frees")
                self._publish(limited=True)
            return []
        if self._status.limited:
            self._publish(limited=False)
        room = room if allowed is None else min(room, allowed)
        try:
            claimed = self.queue.claim(now, room)
        except QueueError as e:
            self._error_backoff = min(60.0, max(1.0, 2 * self._error_backoff))
            self._claim_after = time.monotonic() + self._error_backoff
            self.log.error("queue_error", error=str(e), retry_in_s=self._error_backoff)
            self._recorder.report.queue_error = str(e)
            self._publish(problem=str(e))
            return []
        if self._error_backoff:
            self._error_backoff = 0.0
            self._publish(problem=None)
        self._backlog = len(claimed) == room
        held = self._recorder.held()  # delivered already, the outcome only to be recorded
        return [msg for msg in claimed if msg.id not in held]

    def _seed_rate(self) -> None:
        """The rate window, from what the queue records of mail sent within one period."""
        if self.rate_limit is None:
            return
        now = self.clock()
        try:
            sent = self.queue.sent_times(now - self.rate_limit.period, self.rate_limit.count)
        except QueueError as e:
            self.log.warning("sent_record_unreadable", error=str(e), note="the rate window starts empty")
            sent = []
        self._rate = RateWindow(self.rate_limit, sent)

    def _await(self, timeout: float, inflight: dict[Future, QueuedMessage]) -> list[Attempt]:
        """Wait up to `timeout` for events; the deliveries that finished meanwhile."""
        if self._rescan_at is not None:
            timeout = max(0.0, min(timeout, self._rescan_at - time.monotonic()))
        item = self._next_event(timeout)
        if item is None:  # the time is up: a poll, the scan after a wake-up, a file settled
            self._look, self._rescan_at = True, None
            return []
        finished = []
        while item is not None:
            if item is _WAKE or item is _SCAN:
                if item is _SCAN:
                    self.queue.rescan()
                self._look = True
                self._rescan_at = time.monotonic() + RESCAN_AFTER
            elif item in inflight:
                saturated = len(inflight) >= self.concurrency.limit
                msg = inflight.pop(item)
                if item.cancelled():
                    self._release([msg])
                else:
                    done = item.result()
                    finished.append(done)
                    self._look = self._look or self._backlog
                    self.concurrency.done(isinstance(done.outcome, TemporaryFailure | PartlySent), saturated)
                    self._gate.set_limit(self.concurrency.limit)
            item = self._next_event(0)
        return finished

    def _next_event(self, timeout: float):
        try:
            item = self._events.get(timeout=None if timeout == math.inf else timeout) if timeout else \
                self._events.get_nowait()
        except stdqueue.Empty:
            return None
        if item is _WAKE:
            self._wake_posted = False
        return item

    def _settle_wait(self, started: float) -> float | None:
        """How long a drain should wait for messages still being written, or None to stop."""
        now = self.clock()
        settles = self.queue.settles_at(now)
        left = DRAIN_SETTLE_WAIT - (time.monotonic() - started)
        if settles is None or left <= 0:
            return None
        return min(max(settles - now, 0.01), left)

    def _publish(self, **changes) -> None:
        """A new status snapshot: this turn's heartbeat, and `changes`."""
        before = self._status.state
        r = self._recorder.report
        self._status = replace(self._status, heartbeat=time.monotonic(), sent=r.sent, deferred=r.deferred,
                               failed=r.failed, concurrency=self.concurrency.limit, **changes)
        if self._status.state != before and self.supervision.on_status is not None:
            self.supervision.on_status()

    def _release(self, msgs: list[QueuedMessage]) -> None:
        try:
            self.queue.release(msgs)
        except QueueError as e:
            self.log.warning("release_failed", error=str(e), note="the claims lapse when this process exits")

    def _maintain(self) -> None:
        try:
            self.queue.maintain(self.clock())
        except QueueError as e:
            self.log.warning("maintenance_failed", error=str(e))


class _Chores:
    """The daemon's pace: besides waiting for events, it polls, maintains the queue hourly,
    refreshes its stats for the supervisor and keeps trying to watch for file events."""

    def __init__(self, relay: Relay, watch):
        self.relay, self.watch = relay, watch
        self.next_maintain = relay.clock() + MAINTAIN_EVERY
        self.next_stats = time.monotonic()

    def pace(self, busy: bool) -> float:
        relay, supervision = self.relay, self.relay.supervision
        now, mono = relay.clock(), time.monotonic()
        if now >= self.next_maintain:
            relay._maintain()
            self.next_maintain = now + MAINTAIN_EVERY
        if not self.watch.running:
            self.watch.start()
        waits = [self._idle(now), supervision.max_sleep or math.inf]
        if relay._claim_after > mono:  # a queue error: look again once the backoff is over
            waits.append(relay._claim_after - mono)
        frees = relay._rate.frees_at(now)
        if frees is not None:  # at the rate limit: look again once the window frees
            waits.append(frees - now)
        if supervision.stats_every:
            if mono >= self.next_stats:
                self.next_stats = mono + supervision.stats_every
                try:
                    relay._publish(stats=relay.queue.stats(now))
                except QueueError as e:
                    relay.log.warning("stats_failed", error=str(e))
            waits.append(self.next_stats - mono)
        return max(0.0, min(waits))

    def _idle(self, now: float) -> float:
        relay = self.relay
        try:
            due = relay.queue.next_due(now)
        except QueueError:
            due = None
        if due is None:
            return relay.poll_interval
        # Due already yet not claimed (another process holds it): look again, but never spin.
        return min(due - now if due > now else 1.0, relay.poll_interval)

