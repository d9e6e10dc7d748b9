"""The relay's decisions: what is sent, retried, set aside, and when."""

import random

from mailrelayd.relay import Relay, RetryPolicy
from mailrelayd.transports.maildir import MaildirTransport
from mailrelayd.values import Rate
from conftest import fossil_message


def test_drain_sends_everything_and_exits_zero(queue_harness, make_relay, fake_sendmail):
    """A pass over a queue of good messages sends them all: exit status 0."""
    for i in range(10):
        queue_harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    report = make_relay(queue_harness).drain()
    assert (report.sent, report.exit_status) == (10, 0)
    assert queue_harness.queued() == 0 and len(fake_sendmail.calls()) == 10


def test_empty_queue_drains_with_status_zero(queue_harness, make_relay):
    """Nothing to send is success."""
    assert make_relay(queue_harness).drain().exit_status == 0


def test_temporary_failure_defers_with_backoff(queue_harness, make_relay, fake_sendmail, clock):
    """EX_TEMPFAIL keeps the message, counts the attempt and schedules the next try 5 min on."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(75, "try later")
    report = make_relay(queue_harness, rng=random.Random(1)).drain()
    assert report.exit_status == 75 and queue_harness.queued() == 1
    [(attempts, next_try, error)] = queue_harness.deferred()
    assert attempts == 1 and 270 <= next_try - clock.now <= 330 and "try later" in error


def test_deferred_message_is_not_retried_before_it_is_due(queue_harness, make_relay, fake_sendmail, clock):
    """A second pass right after a deferral does not try again (no busy loop)."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(75)
    relay = make_relay(queue_harness)
    relay.drain()
    assert relay.drain().exit_status == 0 and len(fake_sendmail.calls()) == 1


def test_retry_delays_double_up_to_the_maximum():
    """Delays go 5, 10, 20, 40 minutes, then stay at the one-hour cap (within jitter)."""
    policy, rng = RetryPolicy(300, 3600, 5 * 86400), random.Random(7)
    delays = [policy.delay(attempt, rng) for attempt in range(1, 8)]
    for delay, expected in zip(delays, [300, 600, 1200, 2400, 3600, 3600, 3600]):
        assert 0.9 * expected <= delay <= 1.1 * expected


def test_message_is_retried_once_due_and_then_sent(queue_harness, make_relay, fake_sendmail, clock):
    """After its delay, a deferred message is tried again and sent."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(75)
    relay = make_relay(queue_harness)
    relay.drain()
    fake_sendmail.exit_with(0)
    clock.advance(400)
    assert relay.drain().sent == 1 and queue_harness.queued() == 0


def test_message_past_max_age_is_set_aside(queue_harness, make_relay, fake_sendmail, clock):
    """Temporary failures stop being retried after max_age; the message is kept as failed."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(75, "still down")
    relay = make_relay(queue_harness, retry=RetryPolicy(300, 3600, 86400))
    relay.drain()
    clock.advance(86400)
    report = relay.drain()
    assert report.failed == 1 and report.exit_status == 65
    [(reason, attempts)] = queue_harness.failed()
    assert reason.startswith("gave up after 2 attempts") and "still down" in reason and attempts == 2


def test_permanent_failure_is_set_aside_at_once(queue_harness, make_relay, fake_sendmail):
    """A permanent status sets the message aside with the reason: exit 65."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(67, "user unknown")
    report = make_relay(queue_harness).drain()
    assert report.exit_status == 65 and queue_harness.queued() == 0
    assert "EX_NOUSER" in queue_harness.failed()[0][0]


def test_deferral_outranks_failure_in_exit_status(queue_harness, make_relay, fake_sendmail):
    """With both a deferred and a failed message the pass exits 75: something is still pending."""
    queue_harness.enqueue(b"no header at all")
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(75)
    assert make_relay(queue_harness).drain().exit_status == 75


def test_message_without_recipients_is_set_aside_unsent(queue_harness, make_relay, fake_sendmail):
    """A message with nobody to send to never reaches sendmail and is kept with the reason."""
    queue_harness.enqueue(b"Subject: nobody\r\nFrom: a@x.org\r\n\r\nbody")
    assert make_relay(queue_harness).drain().failed == 1
    assert fake_sendmail.calls() == [] and "no recipients" in queue_harness.failed()[0][0]


def test_failing_message_does_not_block_the_others(queue_harness, make_relay, fake_sendmail):
    """A bad message first in the queue leaves every later one deliverable."""
    queue_harness.enqueue(b"garbage")
    for i in range(3):
        queue_harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    report = make_relay(queue_harness).drain()
    assert (report.sent, report.failed) == (3, 1)


def test_fixed_envelope_sender_replaces_header_sender(queue_harness, make_relay, fake_sendmail):
    """envelope_from set to an address is used for -f whatever the header says."""
    queue_harness.enqueue(fossil_message(sender="proj@example.org"))
    make_relay(queue_harness, envelope_from="bounces@example.net").drain()
    assert fake_sendmail.calls()[0][0] == ["-ti", "-f", "bounces@example.net"]


def test_envelope_from_none_passes_no_sender(queue_harness, make_relay, fake_sendmail):
    """envelope_from = none leaves -f off, for MTAs that set the sender themselves."""
    queue_harness.enqueue(fossil_message())
    make_relay(queue_harness, envelope_from="none").drain()
    assert fake_sendmail.calls()[0][0] == ["-ti"]


def test_maildir_transport_writes_each_message_into_new(queue_harness, tmp_path, clock):
    """The Maildir transport leaves one LF-ended file per message in new/, after its envelope lines, and none in tmp/."""
    data = fossil_message()
    queue_harness.enqueue(data)
    relay = Relay(queue_harness.open_queue(), MaildirTransport(tmp_path / "Maildir"), clock=clock)
    assert relay.drain().sent == 1
    [written] = (tmp_path / "Maildir" / "new").iterdir()
    envelope = b"Return-Path: <noreply@example.org>\nX-Original-To: bob@example.com\nDelivered-To: bob@example.com\n"
    assert written.read_bytes() == envelope + data.replace(b"\r\n", b"\n")
    assert list((tmp_path / "Maildir" / "tmp").iterdir()) == []


def test_a_failed_message_brings_the_administrator_a_notice(queue_harness, fake_sendmail, make_relay):
    """With notify_failed, a message set aside queues one short notice (same transport, same drain), never one about the notice."""
    queue_harness.enqueue(fossil_message(to="bob@example.com", subject="Ticket 42", body="SECRET BODY\r\n"))
    fake_sendmail.exit_with(65, "bad address")  # fails the notice too: no notice about a notice
    report = make_relay(queue_harness, notify_failed="admin@example.org").drain()
    assert (report.sent, report.failed) == (0, 2)
    [(_, original), (_, notice)] = fake_sendmail.calls()
    assert b"Ticket 42" in original
    assert b"To: admin@example.org" in notice and b"X-Mailrelayd-Notice: failed" in notice
    assert b"bob@example.com" in notice and b"Ticket 42" in notice and b"bad address" in notice
    assert b"SECRET BODY" not in notice and b"mailrelayd retry --failed" in notice


def test_no_notice_without_notify_failed(queue_harness, fake_sendmail, make_relay):
    """Without notify_failed a message set aside brings no notice."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(65)
    report = make_relay(queue_harness).drain()
    assert report.failed == 1 and len(fake_sendmail.calls()) == 1


def test_more_recipients_than_max_recipients_is_set_aside_unsent(queue_harness, make_relay, fake_sendmail):
    """A message for more recipients than max_recipients never reaches sendmail and is set aside with the reason."""
    queue_harness.enqueue(fossil_message(to="a@example.com, b@example.com, c@example.com"))
    report = make_relay(queue_harness, max_recipients=2).drain()
    assert report.failed == 1 and fake_sendmail.calls() == []
    [(reason, _)] = queue_harness.failed()
    assert reason == "3 recipients, over max_recipients (2)"


def test_messages_over_the_rate_limit_wait_untouched(queue_harness, make_relay, fake_sendmail, clock):
    """Past rate_limit a drain sends no more, leaves the rest queued with no attempt counted, and exits 75."""
    for i in range(5):
        queue_harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    report = make_relay(queue_harness, rate_limit=Rate(3, 3600.0)).drain()
    assert (report.sent, report.rate_limited, report.exit_status) == (3, True, 75)
    assert queue_harness.queued() == 2 and queue_harness.deferred() == [] and queue_harness.failed() == []
    assert len(fake_sendmail.calls()) == 3


def test_the_rate_window_frees_after_its_period(queue_harness, make_relay, fake_sendmail, clock):
    """Once the period has passed, the messages that waited go out."""
    for i in range(5):
        queue_harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    relay = make_relay(queue_harness, rate_limit=Rate(3, 3600.0))
    relay.drain()
    clock.advance(3601)
    report = relay.drain()
    assert (report.sent, report.exit_status) == (2, 0) and queue_harness.queued() == 0


def test_the_rate_window_carries_over_to_the_next_drain(sqlite_harness, make_relay, fake_sendmail, clock):
    """A drain run from cron counts what earlier drains sent (sentlog): it does not start a fresh window."""
    for i in range(5):
        sqlite_harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    assert make_relay(sqlite_harness, rate_limit=Rate(3, 3600.0)).drain().sent == 3
    clock.advance(60)
    report = make_relay(sqlite_harness, rate_limit=Rate(3, 3600.0)).drain()
    assert (report.sent, report.exit_status) == (0, 75) and sqlite_harness.queued() == 2


def test_an_outcome_that_cannot_be_recorded_is_never_sent_again_by_the_relay(sqlite_harness, make_relay,
                                                                             fake_sendmail):
    """Sent, but the queue refuses to record it (another program holds the write lock): the drain exits 75, not 0, the message stays queued, and the next pass records it without sending it again."""
    import sqlite3
    import threading

    from conftest import started_calls, wait_until

    sqlite_harness.enqueue(fossil_message())
    fake_sendmail.take_seconds(0.5)
    relay = make_relay(sqlite_harness)
    locked, done = threading.Event(), threading.Event()

    def block():  # another program: takes the write lock while sendmail runs, keeps it until told
        wait_until(lambda: started_calls(fake_sendmail), what="the delivery to start")
        blocker = sqlite3.connect(sqlite_harness.path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # recording the outcome waits 5 s for this lock, twice, then gives up
        locked.set()
        done.wait(60)
        blocker.execute("ROLLBACK")
        blocker.close()

    blocking = threading.Thread(target=block)
    blocking.start()
    try:
        reports = [relay.drain()]
    finally:
        done.set()
        blocking.join()
    assert locked.is_set()
    [report] = reports
    assert (report.sent, report.unrecorded, report.exit_status) == (0, 1, 75)
    assert sqlite_harness.queued() == 1 and len(fake_sendmail.calls()) == 1
    fake_sendmail.take_seconds(0)
    again = relay.drain()
    assert (again.sent, again.exit_status) == (1, 0)
    assert sqlite_harness.queued() == 0 and len(fake_sendmail.calls()) == 1
