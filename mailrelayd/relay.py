"""The relay: take due messages from a queue, deliver them concurrently, record outcomes.

`drain` is one pass (deliver everything due, then return); `run` is the daemon loop,
the same engine woken by file events, signals and a poll timer. Queue access stays on
the calling thread; only transports run on the worker threads.
"""

from __future__ import annotations

import queue as stdqueue
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from mailrelayd.log import get_logger
from mailrelayd.message import Envelope, MalformedMessage, explicit_envelope, read_envelope
from mailrelayd.notice import failure_notice, is_notice
from mailrelayd.outcome import Outcome, PartlySent, PermanentFailure, Sent, TemporaryFailure
from mailrelayd.queues import Queue, QueuedMessage, QueueError
from mailrelayd.transports import Transport
from mailrelayd.watch import DirectoryWatcher

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
    """What one pass did; its exit status is the drain's."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    queue_error: str | None = None

    @property
    def exit_status(self) -> int:
        if self.queue_error:
            return EX_NOINPUT
        return EX_TEMPFAIL if self.deferred else EX_DATAERR if self.failed else EX_OK


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, until a message is `max_age` old."""

    first_delay: float = 300.0
    max_delay: float = 3600.0
    max_age: float = 5 * 86400.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_delay, self.first_delay * 2 ** min(attempt - 1, 32)) * rng.uniform(0.9, 1.1)


@dataclass(frozen=True)
class _Done:
    msg: QueuedMessage
    envelope: Envelope | None
    outcome: Outcome
    ms: float


_WAKE = object()


class Relay:
    def __init__(
        self,
        queue: Queue,
        transport: Transport,
        *,
        workers: int = 4,
        retry: RetryPolicy = RetryPolicy(),
        poll_interval: float = 10.0,
        envelope_from: str = "header",
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        notify_failed: str | None = None,
        observer: Callable[[str, str, float], None] | None = None,
    ):
        self.queue = queue
        self.transport = transport
        self.workers = workers
        self.retry = retry
        self.poll_interval = poll_interval
        self.envelope_from = envelope_from
        self.clock = clock
        self.rng = rng or random.Random()
        self.notify_failed = notify_failed
        self.observer = observer  # observer(queue name, "sent"|"deferred"|"failed", seconds): metrics
        self.log = get_logger(queue=queue.name)
        # Read by a supervisor on another thread (plain attribute reads):
        self.heartbeat = time.monotonic()  # the loop's last turn; stale means the loop hangs
        self.max_sleep: float | None = None  # the loop turns at least this often when set
        self.stats_every: float | None = None  # refresh `stats` this often when set
        self.stats = None  # QueueStats, from the relay's own thread
        self.totals = DrainReport()  # what `run` has done so far
        self.open_attempted = False  # `run` has tried to open the queue once (it may be waiting for it)
        self.on_change: Callable[[], None] = lambda: None  # called when open_attempted becomes true
        self._next_stats = 0.0
        self._events: stdqueue.SimpleQueue = stdqueue.SimpleQueue()
        self._wake_posted = False
        self._stopping = False
        self._unrecorded: list[_Done] = []
        self._progress: Callable[[DrainReport], None] | None = None
        self._added = False  # a notice was queued: claim again (a drain sends it too)

    # -- called from signal handlers and other threads: set flags, post a token ----

    def wake(self) -> None:
        """Scan the queue now. Safe from signal handlers and the watcher's thread."""
        if not self._wake_posted:
            self._wake_posted = True
            self._events.put(_WAKE)

    def stop(self) -> None:
        """Take no new work; `run` returns once in-flight deliveries are done."""
        self._stopping = True
        self._events.put(_WAKE)

    # -- the two ways to run ------------------------------------------------------

    def drain(self, progress: Callable[[DrainReport], None] | None = None) -> DrainReport:
        """Deliver every message that is due now, then return what happened.

        `progress(report)` is called after each recorded outcome (a progress bar)."""
        report = DrainReport()
        try:
            self.queue.open()
            self._maintain()
        except QueueError as e:
            report.queue_error = str(e)
            return report
        self._progress = progress
        self._loop(report, until_idle=True)
        return report

    def pending(self) -> int | None:
        """Messages waiting to be sent now (a drain's total), or None if unknown."""
        try:
            self.queue.open()
            return self.queue.stats(self.clock()).queued
        except QueueError:
            return None

    def run(self) -> int:
        """Relay until `stop()`: wake on file events, SIGUSR1 (`wake`) and every poll interval.

        Returns the exit status: 0, or 66 when the queue's set-up can never work."""
        watcher = DirectoryWatcher(self.queue.watch_dir, self.queue.notice, self.wake)
        said_events = said_queue = None  # each problem is logged once, not at every retry
        while not self._stopping:
            self.heartbeat = time.monotonic()
            why = watcher.start()
            if why and why != said_events:
                self.log.warning("file_events_unavailable", reason=why, poll_interval_s=self.poll_interval)
                said_events = why
            try:
                self.queue.open()
                break
            except QueueError as e:
                self._attempted()
                if e.permanent:
                    self.log.critical("queue_unavailable", error=str(e), note="this cannot come right by waiting")
                    watcher.stop()
                    self.queue.close()
                    return EX_NOINPUT
                if str(e) != said_queue:
                    self.log.error("queue_unavailable", error=str(e), retry_in_s=self.poll_interval)
                    said_queue = str(e)
                self._wait(min(self.poll_interval, self.max_sleep or self.poll_interval))
        if not self._stopping:
            self.log.info("relay_started", workers=self.workers, file_events=watcher.running)
            self._attempted()
            self._maintain()
            self._loop(self.totals, until_idle=False, watcher=watcher)
        watcher.stop()
        self.queue.close()
        self.log.info("relay_stopped")
        return EX_OK

    def _attempted(self) -> None:
        if not self.open_attempted:
            self.open_attempted = True
            self.on_change()

    # -- the engine ---------------------------------------------------------------

    def _loop(self, report: DrainReport, until_idle: bool, watcher: DirectoryWatcher | None = None) -> None:
        inflight: dict[Future, QueuedMessage] = {}
        capacity = 2 * self.workers  # claimed at once: in flight, or waiting for a worker
        want_claim, backlog = True, False
        rescan_at = None  # time.monotonic() of the scan that follows a wake-up
        drain_started = time.monotonic()
        next_maintain = self.clock() + MAINTAIN_EVERY
        with ThreadPoolExecutor(self.workers, thread_name_prefix="deliver") as pool:
            while True:
                self.heartbeat = time.monotonic()
                self._record_unrecorded(report)
                if self._stopping:
                    break
                now = self.clock()
                if self.stats_every and self.heartbeat >= self._next_stats:
                    self._refresh_stats(now)
                if want_claim and len(inflight) <= self.workers:
                    want_claim = False
                    asked = capacity - len(inflight)
                    try:
                        claimed = self.queue.claim(now, asked)
                    except QueueError as e:
                        self.log.error("queue_error", error=str(e))
                        if until_idle:
                            report.queue_error = str(e)
                        claimed = []
                    for msg in claimed:
                        future = pool.submit(self._deliver, msg)
                        inflight[future] = msg
                        future.add_done_callback(self._events.put)
                    backlog = len(claimed) == asked
                if until_idle:  # wake for completions, and for files still being written
                    timeout = None if report.queue_error else self._settle_wait(now, drain_started)
                    if timeout is None and not inflight and (report.queue_error or not (backlog or want_claim)):
                        break
                else:
                    timeout = self._idle_timeout(now, inflight)
                if rescan_at is not None:
                    timeout = max(0.0, min(timeout, rescan_at - time.monotonic()))
                if not until_idle and self.max_sleep:
                    timeout = min(timeout, self.max_sleep)
                if not until_idle and self.stats_every:
                    timeout = max(0.0, min(timeout, self._next_stats - time.monotonic()))
                item = self._next_event(timeout)
                if item is None:  # poll timer, or the scan after a wake-up
                    want_claim = True
                    rescan_at = None
                    if watcher is not None and not watcher.running:
                        watcher.start()
                    if self.clock() >= next_maintain:
                        self._maintain()
                        next_maintain = self.clock() + MAINTAIN_EVERY
                elif item is _WAKE:
                    want_claim = True
                    rescan_at = None if until_idle else time.monotonic() + RESCAN_AFTER
                elif item in inflight:
                    finished = [item]
                    while True:  # record whatever else has finished meanwhile in the same breath
                        try:
                            more = self._events.get_nowait()
                        except stdqueue.Empty:
                            break
                        if more is _WAKE:
                            self._wake_posted, want_claim = False, True
                            rescan_at = None if until_idle else time.monotonic() + RESCAN_AFTER
                        elif more in inflight:
                            finished.append(more)
                    done = []
                    for future in finished:
                        msg = inflight.pop(future)
                        if future.cancelled():
                            self._release([msg])
                        else:
                            done.append(future.result())
                    self._settle_all(done, report)
                    want_claim = want_claim or backlog or self._added
                    self._added = False
            for future in list(inflight):
                if future.cancel():
                    self._release([inflight.pop(future)])
            while inflight:
                item = self._next_event(None)
                if isinstance(item, Future) and item in inflight:
                    inflight.pop(item)
                    if not item.cancelled():
                        self._settle(item.result(), report)
        self._record_unrecorded(report, final=True)

    def _next_event(self, timeout: float | None):
        try:
            item = self._events.get(timeout=timeout)
        except stdqueue.Empty:
            return None
        if item is _WAKE:
            self._wake_posted = False
        return item

    def _idle_timeout(self, now: float, inflight: dict) -> float:
        if inflight:
            return self.poll_interval
        try:
            due = self.queue.next_due(now)
        except QueueError:
            due = None
        if due is None:
            return self.poll_interval
        # Due already yet not claimed (another process holds it): look again, but never spin.
        return min(due - now if due > now else 1.0, self.poll_interval)

    def _settle_wait(self, now: float, started: float) -> float | None:
        """How long a drain should wait for messages still being written, or None to stop."""
        settles = self.queue.settles_at(now)
        left = DRAIN_SETTLE_WAIT - (time.monotonic() - started)
        if settles is None or left <= 0:
            return None
        return min(max(settles - now, 0.01), left)

    def _wait(self, seconds: float) -> None:
        self._next_event(seconds)

    # -- one delivery (on a worker thread) ----------------------------------------

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

    # -- recording outcomes (on the relay's thread) -------------------------------

    def _settle_all(self, done: list[_Done], report: DrainReport) -> None:
        """Record outcomes; all the sent ones in one go (one statement for SQLite)."""
        sent = [d for d in done if isinstance(d.outcome, Sent)]
        if len(sent) > 1:
            try:
                self.queue.mark_sent([(d.msg, d.envelope) for d in sent], self.clock())
            except QueueError as e:
                self.log.error("outcome_not_recorded", emailids=[d.msg.id for d in sent], error=str(e),
                               will_retry=True)
                self._unrecorded.extend(sent)
            else:
                for d in sent:
                    self._count(report, "sent", d)
                    self.log.info("message_sent", outcome="sent", **self._context(d))
            done = [d for d in done if not isinstance(d.outcome, Sent)]
        for d in done:
            self._settle(d, report)

    def _settle(self, done: _Done, report: DrainReport) -> None:
        try:
            self._record(done, report)
        except QueueError as e:
            self.log.error("outcome_not_recorded", emailid=done.msg.id, error=str(e), will_retry=True)
            self._unrecorded.append(done)

    def _record_unrecorded(self, report: DrainReport, final: bool = False) -> None:
        pending, self._unrecorded = self._unrecorded, []
        for done in pending:
            self._settle(done, report)
        if final:
            for done in self._unrecorded:
                self.log.critical(
                    "outcome_lost", emailid=done.msg.id, outcome=done.outcome.name,
                    note="the queue still holds this message; it will be tried again",
                )

    def _record(self, done: _Done, report: DrainReport) -> None:
        msg, envelope, outcome = done.msg, done.envelope, done.outcome
        now = self.clock()
        attempt = msg.attempts + 1
        context = self._context(done)
        match outcome:
            case Sent():
                self.queue.mark_sent([(msg, envelope)], now)
                self._count(report, "sent", done)
                self.log.info("message_sent", outcome="sent", **context)
            case PermanentFailure(detail=detail):
                self.queue.set_aside(msg, detail, now)
                self._count(report, "failed", done)
                self.log.error("message_failed", outcome="failed", reason=detail, **context)
                self._notify_failed(done, detail, now)
            case TemporaryFailure(detail=detail) if now - msg.first_seen >= self.retry.max_age:
                reason = f"gave up after {attempt} attempts over {_days(now - msg.first_seen)}: {detail}"
                self.queue.set_aside(msg, reason, now)
                self._count(report, "failed", done)
                self.log.error("message_failed", outcome="failed", reason=reason, **context)
                self._notify_failed(done, reason, now)
            case TemporaryFailure(detail=detail, setup_error=setup_error):
                delay = self.retry.delay(attempt, self.rng)
                self.queue.defer(msg, detail, now + delay, now)
                self._count(report, "deferred", done)
                level = self.log.error if setup_error else self.log.warning
                level("message_deferred", outcome="deferred", reason=detail, retry_in_s=round(delay), **context)
            case PartlySent(accepted=accepted, temporary=temporary, permanent=permanent):
                self._record_partial(done, accepted, temporary, permanent, now, report, context)

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

    def _record_partial(self, done, accepted, temporary, permanent, now, report, context) -> None:
        """Some recipients took it: retry only the temporary refusals, report the others."""
        msg = done.msg
        for recipient, reply in permanent:
            self.log.error("recipient_refused", emailid=msg.id, recipient=recipient, reason=reply)
        summary = "; ".join(f"{r}: {reply}" for r, reply in (*temporary, *permanent))
        summary += f" (delivered to {len(accepted)} other recipient{'s' * (len(accepted) != 1)})"
        context = {**context, "accepted": ",".join(accepted)}
        if temporary and now - msg.first_seen < self.retry.max_age:
            delay = self.retry.delay(msg.attempts + 1, self.rng)
            self.queue.defer(msg, summary, now + delay, now, recipients=tuple(r for r, _ in temporary))
            self._count(report, "deferred", done)
            self.log.warning("message_deferred", outcome="partly sent", reason=summary, retry_in_s=round(delay),
                             **context)
        else:
            self.queue.set_aside(msg, summary, now, recipients=tuple(r for r, _ in (*temporary, *permanent)))
            self._count(report, "failed", done)
            self.log.error("message_failed", outcome="partly sent", reason=summary, **context)
            self._notify_failed(done, summary, now)

    def _count(self, report: DrainReport, outcome: str, done: _Done) -> None:
        setattr(report, outcome, getattr(report, outcome) + 1)
        if self.observer is not None:
            self.observer(self.queue.name, outcome, done.ms / 1000)
        if self._progress is not None:
            self._progress(report)

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
            self._added = True
            self.log.info("notice_queued", emailid=done.msg.id, notice=notice_id, to=self.notify_failed)

    def _refresh_stats(self, now: float) -> None:
        self._next_stats = time.monotonic() + self.stats_every
        try:
            self.stats = self.queue.stats(now)
        except QueueError as e:
            self.log.warning("stats_failed", error=str(e))

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


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} hours"
