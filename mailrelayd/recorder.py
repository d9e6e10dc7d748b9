"""What happens to a message after an attempt: the one place outcomes are recorded.

The Recorder turns each attempt's Outcome into the queue's acknowledgement (sent,
deferred with backoff, set aside), one log line, the counts of a DrainReport, the
metrics observer and, when asked, a failure notice to the administrator. An outcome the
queue cannot record (a locked file, a full disk) is kept and tried again at the next
call: its message stays claimed and is never delivered again by this process.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from mailrelayd.attempt import Attempt
from mailrelayd.message import listed
from mailrelayd.outcome import PartlySent, PermanentFailure, Sent, TemporaryFailure
from mailrelayd.queues import Queue, QueueError


@dataclass
class DrainReport:
    """What one pass (or a daemon so far) did; its exit status is the drain's."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    queue_error: str | None = None
    unrecorded: int = 0  # outcomes the queue could not record: the messages stay queued
    rate_limited: bool = False  # due messages were left queued by the rate limit
    refused: int = 0  # entries refused unread (a spool's corrupt/, rows over max_size)

    def add(self, other: DrainReport) -> None:
        """Count another pass in (a drain over several queues)."""
        self.sent, self.deferred, self.failed = self.sent + other.sent, self.deferred + other.deferred, \
            self.failed + other.failed
        self.unrecorded += other.unrecorded
        self.refused += other.refused
        self.rate_limited = self.rate_limited or other.rate_limited
        self.queue_error = other.queue_error or self.queue_error

    @property
    def exit_status(self) -> int:
        if self.queue_error:
            return os.EX_NOINPUT
        if self.deferred or self.unrecorded or self.rate_limited:
            return os.EX_TEMPFAIL
        return os.EX_DATAERR if self.failed or self.refused else os.EX_OK


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, until a message is `max_age` old."""

    first_delay: float = 300.0
    max_delay: float = 3600.0
    max_age: float = 5 * 86400.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_delay, self.first_delay * 2 ** min(attempt - 1, 32)) * rng.uniform(0.9, 1.1)


class Recorder:
    """Records attempts on `queue`; `report` counts what was recorded."""

    def __init__(self, queue: Queue, log, *, retry: RetryPolicy, clock: Callable[[], float], rng: random.Random,
                 notify_failed: str | None = None, observer: Callable[[str, str, float], None] | None = None):
        self.queue = queue
        self.log = log
        self.retry = retry
        self.clock = clock
        self.rng = rng
        self.notify_failed = notify_failed
        self.observer = observer  # observer(queue name, "sent"|"deferred"|"failed", seconds): metrics
        self.progress: Callable[[DrainReport], None] | None = None  # after each recorded attempt
        self.report = DrainReport()
        self.noticed = False  # a failure notice was queued since the flag was last cleared
        self._unrecorded: list[Attempt] = []

    def held(self) -> set[int | str]:
        """Ids of messages whose outcome is still to be recorded: never to be delivered again."""
        return {a.msg.id for a in self._unrecorded}

    def record(self, attempts: list[Attempt], final: bool = False) -> None:
        """Record these attempts and any not recorded before; all the sent ones in one go (one
        statement for SQLite). With `final`, what still cannot be recorded is reported lost
        (the queue keeps those messages: they will be tried again)."""
        pending, self._unrecorded = self._unrecorded + attempts, []
        sent = [a for a in pending if isinstance(a.outcome, Sent)]
        if sent:
            try:
                self.queue.mark_sent([(a.msg, a.envelope) for a in sent], self.clock())
            except QueueError as e:
                self._not_recorded(sent, e)
            else:
                for a in sent:
                    self._count("sent", a)
                    self.log.info("message_sent", outcome="sent", **_context(a))
        for a in pending:
            if not isinstance(a.outcome, Sent):
                try:
                    self._record_one(a)
                except QueueError as e:
                    self._not_recorded([a], e)
        if final:
            for a in self._unrecorded:
                self.log.critical("outcome_lost", emailid=a.msg.id, outcome=a.outcome.name,
                                  note="the queue still holds this message; it will be tried again")
            self.report.unrecorded = len(self._unrecorded)

    def _not_recorded(self, attempts: list[Attempt], error: QueueError) -> None:
        self.log.error("outcome_not_recorded", emailids=[a.msg.id for a in attempts], error=str(error),
                       will_retry=True)
        self._unrecorded.extend(attempts)

    def _record_one(self, attempt: Attempt) -> None:
        msg, now = attempt.msg, self.clock()
        match attempt.outcome:
            case PermanentFailure(detail=detail):
                self._set_aside(attempt, detail, now)
            case TemporaryFailure(detail=detail) if now - msg.first_seen >= self.retry.max_age:
                self._set_aside(attempt, f"gave up after {msg.attempts + 1} attempts over"
                                         f" {_days(now - msg.first_seen)}: {detail}", now)
            case TemporaryFailure(detail=detail, setup_error=setup_error):
                delay = self.retry.delay(msg.attempts + 1, self.rng)
                self.queue.defer(msg, detail, now + delay, now)
                self._count("deferred", attempt)
                level = self.log.error if setup_error else self.log.warning
                level("message_deferred", outcome="deferred", reason=detail, retry_in_s=round(delay),
                      **_context(attempt))
            case PartlySent(accepted=accepted, temporary=temporary, permanent=permanent):
                self._record_partial(attempt, accepted, temporary, permanent, now)

    def _record_partial(self, attempt: Attempt, accepted, temporary, permanent, now: float) -> None:
        """Some recipients took it: retry only the temporary refusals, report the others."""
        msg = attempt.msg
        for recipient, reply in permanent:
            self.log.error("recipient_refused", emailid=msg.id, recipient=recipient, reason=reply)
        summary = "; ".join(f"{r}: {reply}" for r, reply in (*temporary, *permanent))
        summary += f" (delivered to {len(accepted)} other recipient{'s' * (len(accepted) != 1)})"
        if temporary and now - msg.first_seen < self.retry.max_age:
            delay = self.retry.delay(msg.attempts + 1, self.rng)
            self.queue.defer(msg, summary, now + delay, now, recipients=tuple(r for r, _ in temporary))
            self._count("deferred", attempt)
            self.log.warning("message_deferred", outcome="partly sent", reason=summary, retry_in_s=round(delay),
                             accepted=listed(accepted, sep=","), **_context(attempt))
        else:
            self._set_aside(attempt, summary, now, recipients=tuple(r for r, _ in (*temporary, *permanent)),
                            outcome="partly sent", accepted=listed(accepted, sep=","))

    def _set_aside(self, attempt: Attempt, reason: str, now: float, recipients: tuple[str, ...] | None = None,
                   outcome: str = "failed", **context) -> None:
        self.queue.set_aside(attempt.msg, reason, now, recipients=recipients)
        self._count("failed", attempt)
        self.log.error("message_failed", outcome=outcome, reason=reason, **context, **_context(attempt))
        self._notify_failed(attempt, reason, now)

    def _count(self, outcome: str, attempt: Attempt) -> None:
        setattr(self.report, outcome, getattr(self.report, outcome) + 1)
        if self.observer is not None:
            self.observer(self.queue.name, outcome, attempt.ms / 1000)
        if self.progress is not None:
            self.progress(self.report)

    def _notify_failed(self, attempt: Attempt, reason: str, now: float) -> None:
        """Queue a short notice to the administrator, never about a notice itself."""
        if not self.notify_failed:
            return
        from mailrelayd.notice import failure_notice, is_notice  # the email package: only when needed

        if is_notice(attempt.msg.data):
            return
        notice = failure_notice(self.notify_failed, self.queue.name, attempt.msg.id, attempt.envelope, reason, now)
        try:
            notice_id = self.queue.add(notice, now)
        except QueueError as e:
            self.log.error("notice_not_queued", emailid=attempt.msg.id, error=str(e))
        else:
            self.noticed = True
            self.log.info("notice_queued", emailid=attempt.msg.id, notice=notice_id, to=self.notify_failed)


def _context(attempt: Attempt) -> dict:
    """What every log line about one delivery attempt says (never the body)."""
    envelope = attempt.envelope
    return dict(
        emailid=attempt.msg.id,
        to=listed(envelope.recipients, sep=",") if envelope else None,
        subject=envelope.subject if envelope else None,
        size=len(attempt.msg.data),
        attempt=attempt.msg.attempts + 1,
        ms=round(attempt.ms, 1),
    )


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} hours"
