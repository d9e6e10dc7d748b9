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
import queue as stdqueue
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from mailrelayd.log import get_logger
from mailrelayd.message import Envelope, MalformedMessage, explicit_envelope, read_envelope
from mailrelayd.notice import failure_notice, is_notice
from mailrelayd.outcome import Outcome, PartlySent, PermanentFailure, Sent, TemporaryFailure
from mailrelayd.queues import Queue, QueuedMessage, QueueError, QueueStats
from mailrelayd.transports import Transport
from mailrelayd.watch import Watcher

EX_OK, EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL = 0, 65, 66, 75
MAINTAIN_EVERY = 3600.0
# A file event can arrive before the change is visible: SQLite writes the WAL frames
# (the event) and only then publishes the commit in the WAL index (no event). So every
# wake-up is followed by a second scan this long after the last event.
RESCAN_AFTER = 0.05
# A drain waits this long at most, in all, for files still being written to settle.
DRAIN_SETTLE_WAIT = 60.0


@dataclass
class DrainReport:
    """What one pass (or a daemon so far) did; its exit status is the drain's."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    queue_error: str | None = None
    unrecorded: int = 0  # outcomes the queue could not record: the messages stay queued

    @property
    def exit_status(self) -> int:
        if self.queue_error:
            return EX_NOINPUT
        if self.deferred or self.unrecorded:
            return EX_TEMPFAIL
        return EX_DATAERR if self.failed else EX_OK


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, until a message is `max_age` old."""

    first_delay: float = 300.0
    max_delay: float = 3600.0
    max_age: float = 5 * 86400.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_delay, self.first_delay * 2 ** min(attempt - 1, 32)) * rng.uniform(0.9, 1.1)


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
    problem: str | None = None


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


@dataclass(frozen=True)
class _Done:
    msg: QueuedMessage
    envelope: Envelope | None
    outcome: Outcome
    ms: float


_WAKE, _SCAN = object(), object()


class Relay:
    def __init__(self, queue: Queue, transport: Transport, *, workers: int = 4, retry: RetryPolicy = RetryPolicy(),
                 poll_interval: float = 10.0, envelope_from: str = "header", clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, notify_failed: str | None = None,
                 supervision: Supervision = Supervision()):
        self.queue = queue
        self.transport = transport
        self.workers = workers
        self.retry = retry
        self.poll_interval = poll_interval
        self.envelope_from = envelope_from
        self.clock = clock
        self.rng = rng or random.Random()
        self.notify_failed = notify_failed
        self.supervision = supervision
        self.log = get_logger(queue=queue.name)
        self._events: stdqueue.SimpleQueue = stdqueue.SimpleQueue()
        self._wake_posted = False
        self._stopping = False
        self._status = RelayStatus()
        self._report = DrainReport()
        self._look = True  # claim at the next turn
        self._backlog = False  # the last claim took all it asked for: there is more
        self._rescan_at: float | None = None  # monotonic time of the scan that follows a wake-up
        self._unrecorded: list[_Done] = []
        self._progress: Callable[[DrainReport], None] | None = None

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
        self._events.put(_WAKE)

    def status(self) -> RelayStatus:
        return self._status

    # -- the two ways to run ------------------------------------------------------------

    def drain(self, progress: Callable[[DrainReport], None] | None = None) -> DrainReport:
        """Deliver every message that is due now, then return what happened.

        `progress(report)` is called after each recorded outcome (a progress bar)."""
        self._report, self._look = DrainReport(), True
        try:
            self.queue.open()
        except QueueError as e:
            self._report.queue_error = str(e)
            return self._report
        self._maintain()
        self._progress = progress
        started = time.monotonic()

        def pace(busy: bool) -> float | None:
            if busy:
                return math.inf
            if self._report.queue_error:
                return None
            return self._settle_wait(started)

        self._relay(pace)
        return self._report

    def pending(self) -> int | None:
        """Messages waiting to be sent now (a drain's total), or None if unknown."""
        try:
            self.queue.open()
            return self.queue.stats(self.clock()).queued
        except QueueError:
            return None

    def run(self) -> int:
        """Relay until `stop()`; the exit status: 0, or 66 when the queue's set-up can never work."""
        watcher = self.supervision.watcher or Watcher()
        watch = watcher.watch(self.queue.watch_dir, self.queue.notice, self.wake)
        try:
            if self._open_when_ready(watch):
                self.log.info("relay_started", workers=self.workers, file_events=watch.running)
                self._publish(state="running", problem=None)
                self._maintain()
                chores = _Chores(self, watch)
                self._relay(chores.pace)
            elif not self._stopping:
                return EX_NOINPUT
            return EX_OK
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
        with ThreadPoolExecutor(self.workers, thread_name_prefix="deliver") as pool:
            while not self._stopping:
                self._publish()
                if self._look and len(inflight) <= self.workers:
                    for msg in self._claim(2 * self.workers - len(inflight)):
                        future = pool.submit(self._deliver, msg)
                        inflight[future] = msg
                        future.add_done_callback(self._events.put)
                wait = pace(bool(inflight))
                if wait is None:
                    break
                self._record(self._await(wait, inflight))
            for future in list(inflight):  # stopping: what has not started goes back
                if future.cancel():
                    self._release([inflight.pop(future)])
            while inflight:
                self._record(self._await(math.inf, inflight))
        self._record([], final=True)

    def _claim(self, room: int) -> list[QueuedMessage]:
        self._look = False
        try:
            claimed = self.queue.claim(self.clock(), room)
        except QueueError as e:
            self.log.error("queue_error", error=str(e))
            self._report.queue_error = str(e)
            return []
        self._backlog = len(claimed) == room
        held = {d.msg.id for d in self._unrecorded}  # sent or failed already: only to be recorded
        return [msg for msg in claimed if msg.id not in held]

    def _await(self, timeout: float, inflight: dict[Future, QueuedMessage]) -> list[_Done]:
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
                msg = inflight.pop(item)
                if item.cancelled():
                    self._release([msg])
                else:
                    finished.append(item.result())
                    self._look = self._look or self._backlog
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
        r = self._report
        self._status = replace(self._status, heartbeat=time.monotonic(), sent=r.sent, deferred=r.deferred,
                               failed=r.failed, **changes)
        if self._status.state != before and self.supervision.on_status is not None:
            self.supervision.on_status()

    # -- one delivery (on a worker thread) ----------------------------------------------

    def _deliver(self, msg: QueuedMessage) -> _Done:
        started = time.perf_counter()
        try:
            if msg.envelope:
                envelope = replace(explicit_envelope(msg.data, *msg.envelope), remaining=msg.partial)
            else:
                envelope = read_envelope(msg.data)
        except MalformedMessage as e:
            return _Done(msg, None, PermanentFailure(str(e)), 0.0)
        if self.envelope_from != "header":
            envelope = replace(envelope, sender=None if self.envelope_from == "none" else self.envelope_from)
        try:
            outcome = self.transport.deliver(msg.data, envelope)
        except Exception as e:  # a transport bug must never lose the message
            outcome = TemporaryFailure(f"internal error in transport: {e!r}", setup_error=True)
        return _Done(msg, envelope, outcome, (time.perf_counter() - started) * 1000)

    # -- recording outcomes (on the relay's thread): the one place ----------------------

    def _record(self, done: list[_Done], final: bool = False) -> None:
        """Record these outcomes and any that could not be recorded before; all the sent ones
        in one go (one statement for SQLite). What the queue refuses to record is kept and
        tried again at the next turn: its message stays claimed and is never delivered again
        by this process."""
        pending, self._unrecorded = self._unrecorded + done, []
        sent = [d for d in pending if isinstance(d.outcome, Sent)]
        if sent:
            try:
                self.queue.mark_sent([(d.msg, d.envelope) for d in sent], self.clock())
            except QueueError as e:
                self._not_recorded(sent, e)
            else:
                for d in sent:
                    self._count("sent", d)
                    self.log.info("message_sent", outcome="sent", **self._context(d))
        for d in pending:
            if not isinstance(d.outcome, Sent):
                try:
                    self._record_one(d)
                except QueueError as e:
                    self._not_recorded([d], e)
        if final:
            for d in self._unrecorded:
                self.log.critical("outcome_lost", emailid=d.msg.id, outcome=d.outcome.name,
                                  note="the queue still holds this message; it will be tried again")
            self._report.unrecorded = len(self._unrecorded)

    def _not_recorded(self, done: list[_Done], error: QueueError) -> None:
        self.log.error("outcome_not_recorded", emailids=[d.msg.id for d in done], error=str(error), will_retry=True)
        self._unrecorded.extend(done)

    def _record_one(self, done: _Done) -> None:
        msg, outcome, now = done.msg, done.outcome, self.clock()
        attempt = msg.attempts + 1
        match outcome:
            case PermanentFailure(detail=detail):
                self._set_aside(done, detail, now)
            case TemporaryFailure(detail=detail) if now - msg.first_seen >= self.retry.max_age:
                self._set_aside(done, f"gave up after {attempt} attempts over {_days(now - msg.first_seen)}: {detail}",
                                now)
            case TemporaryFailure(detail=detail, setup_error=setup_error):
                delay = self.retry.delay(attempt, self.rng)
                self.queue.defer(msg, detail, now + delay, now)
                self._count("deferred", done)
                level = self.log.error if setup_error else self.log.warning
                level("message_deferred", outcome="deferred", reason=detail, retry_in_s=round(delay),
                      **self._context(done))
            case PartlySent(accepted=accepted, temporary=temporary, permanent=permanent):
                self._record_partial(done, accepted, temporary, permanent, now)

    def _record_partial(self, done: _Done, accepted, temporary, permanent, now: float) -> None:
        """Some recipients took it: retry only the temporary refusals, report the others."""
        msg = done.msg
        for recipient, reply in permanent:
            self.log.error("recipient_refused", emailid=msg.id, recipient=recipient, reason=reply)
        summary = "; ".join(f"{r}: {reply}" for r, reply in (*temporary, *permanent))
        summary += f" (delivered to {len(accepted)} other recipient{'s' * (len(accepted) != 1)})"
        if temporary and now - msg.first_seen < self.retry.max_age:
            delay = self.retry.delay(msg.attempts + 1, self.rng)
            self.queue.defer(msg, summary, now + delay, now, recipients=tuple(r for r, _ in temporary))
            self._count("deferred", done)
            self.log.warning("message_deferred", outcome="partly sent", reason=summary, retry_in_s=round(delay),
                             accepted=",".join(accepted), **self._context(done))
        else:
            self._set_aside(done, summary, now, recipients=tuple(r for r, _ in (*temporary, *permanent)),
                            outcome="partly sent", accepted=",".join(accepted))

    def _set_aside(self, done: _Done, reason: str, now: float, recipients: tuple[str, ...] | None = None,
                   outcome: str = "failed", **context) -> None:
        self.queue.set_aside(done.msg, reason, now, recipients=recipients)
        self._count("failed", done)
        self.log.error("message_failed", outcome=outcome, reason=reason, **context, **self._context(done))
        self._notify_failed(done, reason, now)

    @staticmethod
    def _context(done: _Done) -> dict:
        """What every log line about one delivery attempt says (never the body)."""
        envelope = done.envelope
        return dict(
            emailid=done.msg.id,
            to=",".join(envelope.recipients) if envelope else None,
            subject=envelope.subject if envelope else None,
            size=len(done.msg.data),
            attempt=done.msg.attempts + 1,
            ms=round(done.ms, 1),
        )

    def _count(self, outcome: str, done: _Done) -> None:
        setattr(self._report, outcome, getattr(self._report, outcome) + 1)
        if self.supervision.observer is not None:
            self.supervision.observer(self.queue.name, outcome, done.ms / 1000)
        if self._progress is not None:
            self._progress(self._report)

    def _notify_failed(self, done: _Done, reason: str, now: float) -> None:
        """Queue a short notice to the administrator, never about a notice itself."""
        if not self.notify_failed or is_notice(done.msg.data):
            return
        notice = failure_notice(self.notify_failed, self.queue.name, done.msg.id, done.envelope, reason, now)
        try:
            notice_id = self.queue.add(notice, now)
        except QueueError as e:
            self.log.error("notice_not_queued", emailid=done.msg.id, error=str(e))
        else:
            self._look = True  # a drain sends it in the same pass
            self.log.info("notice_queued", emailid=done.msg.id, notice=notice_id, to=self.notify_failed)

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
        waits = [relay.poll_interval if busy else self._idle(now), supervision.max_sleep or math.inf]
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


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} hours"
