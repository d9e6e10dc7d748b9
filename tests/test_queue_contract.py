"""The claim-then-acknowledge contract every queue keeps."""

import email.utils
import os
import sqlite3
import subprocess
import sys

from conftest import ROOT, SpoolHarness, fossil_message

from mailrelayd.message import read_envelope
from mailrelayd.queues import QueueStats

CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

NOW = 1_800_000_000.0


class TestQueueContract:
    def test_claim_returns_message_bytes_and_leaves_it_queued(self, queue_harness):
        """A claim hands out the exact bytes but removes nothing."""
        data = fossil_message(body="caf\xe9\r\n")
        queue_harness.enqueue(data)
        queue = queue_harness.open_queue()
        [msg] = queue.claim(NOW, 10)
        assert (msg.data, msg.attempts) == (data, 0)
        assert queue_harness.queued() == 1

    def test_claimed_message_is_not_claimed_again(self, queue_harness):
        """A second claimer, even in the same process, skips what is held."""
        queue_harness.enqueue(fossil_message())
        first, second = queue_harness.open_queue(), queue_harness.open_queue()
        assert len(first.claim(NOW, 10)) == 1
        assert second.claim(NOW, 10) == []

    def test_claim_respects_limit_in_queue_order(self, queue_harness):
        """At most `limit` messages are claimed, oldest first."""
        for i in range(5):
            queue_harness.enqueue(fossil_message(subject=f"n{i}"))
        claimed = queue_harness.open_queue().claim(NOW, 3)
        assert [b"Subject: n%d" % i in m.data for i, m in enumerate(claimed)] == [True] * 3

    def test_mark_sent_removes_message(self, queue_harness):
        """Only an acknowledged send takes a message out of the queue."""
        queue_harness.enqueue(fossil_message())
        queue = queue_harness.open_queue()
        [msg] = queue.claim(NOW, 10)
        queue.mark_sent([(msg, None)], NOW)
        assert queue_harness.queued() == 0 and queue.claim(NOW, 10) == []

    def test_released_message_can_be_claimed_again(self, queue_harness):
        """Releasing an unstarted claim makes the message available at once."""
        queue_harness.enqueue(fossil_message())
        queue = queue_harness.open_queue()
        queue.release(queue.claim(NOW, 10))
        assert len(queue_harness.open_queue().claim(NOW, 10)) == 1

    def test_deferred_message_waits_for_its_next_try(self, queue_harness):
        """A deferred message is not due before next_try and comes back with attempts counted."""
        queue_harness.enqueue(fossil_message())
        queue = queue_harness.open_queue()
        [msg] = queue.claim(NOW, 10)
        queue.defer(msg, "EX_TEMPFAIL", NOW + 300, NOW)
        assert queue.claim(NOW + 299, 10) == []
        assert queue.next_due(NOW) == NOW + 300
        [again] = queue.claim(NOW + 300, 10)
        assert again.attempts == 1 and again.first_seen == NOW

    def test_set_aside_keeps_message_with_reason(self, queue_harness):
        """A failed message leaves the queue but is kept with its reason."""
        queue_harness.enqueue(fossil_message())
        queue = queue_harness.open_queue()
        [msg] = queue.claim(NOW, 10)
        queue.set_aside(msg, "no such user", NOW)
        assert queue_harness.queued() == 0
        assert queue_harness.failed() == [("no such user", 1)]

    def test_claim_of_a_process_that_died_is_taken_back_at_once(self, queue_harness):
        """A claim whose owner exited without releasing it does not keep the message."""
        queue_harness.enqueue(fossil_message())
        code = queue_harness.open_queue_code() + f"\nassert len(queue.claim({NOW}, 10)) == 1\nos._exit(0)"
        subprocess.run([sys.executable, "-c", "import os\n" + code], check=True, env=CHILD_ENV)
        assert len(queue_harness.open_queue(lease=3600).claim(NOW + 1, 10)) == 1


def dated_message(when: float) -> bytes:
    """A Fossil-like message whose Date: is `when`."""
    return fossil_message().replace(b"Date: Sun, 22 Nov 2026 03:41:57 +0000",
                                    b"Date: " + email.utils.formatdate(when).encode())


class TestStats:
    def test_stats_of_an_empty_queue(self, queue_harness):
        """An empty queue counts nothing and has no oldest message or next try."""
        stats = queue_harness.open_queue().stats(NOW)
        sent = 0 if queue_harness.kind == "sqlite" else None  # a spool without keep_sent keeps no record
        assert stats == QueueStats(queued=0, deferred=0, failed=0, sent_24h=sent, oldest_queued_s=None, next_try=None)

    def test_stats_counts_new_deferred_and_failed(self, queue_harness):
        """A new, a deferred and a set-aside message are counted apart, with the deferred one's next try."""
        for subject in ("deferred", "failed"):
            queue_harness.enqueue(fossil_message(subject=subject))
        queue = queue_harness.open_queue()
        deferred, failed = queue.claim(NOW, 10)
        queue.defer(deferred, "EX_TEMPFAIL", NOW + 300, NOW)
        queue.set_aside(failed, "no such user", NOW)
        queue_harness.enqueue(fossil_message(subject="new"))
        stats = queue.stats(NOW + 1)
        assert (stats.queued, stats.deferred, stats.failed, stats.next_try) == (1, 1, 1, NOW + 300)

    def test_stats_counts_a_due_deferred_message_as_queued(self, queue_harness):
        """Once its next try has come, a deferred message counts as queued."""
        queue_harness.enqueue(fossil_message())
        queue = queue_harness.open_queue()
        [msg] = queue.claim(NOW, 10)
        queue.defer(msg, "EX_TEMPFAIL", NOW + 300, NOW)
        stats = queue.stats(NOW + 300)
        assert (stats.queued, stats.deferred, stats.next_try) == (1, 0, None)

    def test_stats_oldest_age_from_first_seen(self, queue_harness):
        """The oldest message's age runs from when the relay first saw it."""
        queue_harness.enqueue(fossil_message())
        queue = queue_harness.open_queue()
        [msg] = queue.claim(NOW - 100, 10)
        queue.defer(msg, "EX_TEMPFAIL", NOW + 300, NOW - 100)
        assert queue.stats(NOW).oldest_queued_s == 100.0

    def test_stats_oldest_age_of_a_message_never_seen(self, queue_harness):
        """A message the relay has not seen is as old as its Date: (database) or its file (spool)."""
        name = queue_harness.enqueue(dated_message(NOW - 3600))
        if queue_harness.kind == "spool":
            os.utime(queue_harness.path / name, (NOW - 3600, NOW - 3600))
        assert queue_harness.open_queue().stats(NOW).oldest_queued_s == 3600.0

    def test_stats_counts_sent_in_the_last_day(self, queue_harness):
        """sent_24h counts a message sent now, and no longer a day later (spool: with keep_sent)."""
        queue_harness.enqueue(fossil_message())
        queue = queue_harness.open_queue(**({"keep_sent": True} if queue_harness.kind == "spool" else {}))
        [msg] = queue.claim(NOW, 10)
        queue.mark_sent([(msg, read_envelope(msg.data))], NOW)
        assert (queue.stats(NOW).sent_24h, queue.stats(NOW + 86401).sent_24h) == (1, 0)

    def test_stats_do_not_wait_for_the_write_lock(self, sqlite_harness):
        """stats reads while another process holds the database's write lock."""
        sqlite_harness.enqueue(fossil_message())
        queue = sqlite_harness.open_queue()
        other = sqlite3.connect(sqlite_harness.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO email(msg) VALUES ('not yet committed')")
            assert queue.stats(NOW).queued == 1
        finally:
            other.close()


class TestAdd:
    def test_added_message_is_claimed_at_once_with_its_bytes(self, queue_harness):
        """A message added by the relay is due at once, on the same queue object, byte for byte."""
        data = fossil_message(body="caf\xe9\r\n").replace(b"caf\xc3\xa9", b"caf\xe9")  # not UTF-8
        queue = queue_harness.open_queue()
        assert queue.claim(NOW, 10) == []
        ident = queue.add(data, NOW)
        [msg] = queue.claim(NOW, 10)
        assert (str(msg.id), msg.data, msg.attempts, msg.envelope) == (ident, data, 0, None)

    def test_added_message_survives_reopening(self, queue_harness):
        """An added message is on disk: another queue object, opened afterwards, claims it."""
        queue = queue_harness.open_queue()
        ident = queue.add(fossil_message(), NOW)
        queue.close()
        [msg] = queue_harness.open_queue().claim(NOW, 10)
        assert str(msg.id) == ident and msg.data == fossil_message()

    def test_added_message_counts_as_queued(self, queue_harness):
        """An added message counts as queued, not deferred."""
        queue = queue_harness.open_queue()
        queue.add(fossil_message(), NOW - 10)
        stats = queue.stats(NOW)
        assert (stats.queued, stats.deferred) == (1, 0)

    def test_spool_owner_does_not_apply_to_added_messages(self, tmp_path):
        """A spool message the relay added itself is sent even when spool_owner names another user."""
        queue = SpoolHarness(tmp_path).open_queue(owner_uid=os.getuid() + 1)
        ident = queue.add(fossil_message(), NOW)
        [msg] = queue.claim(NOW, 10)
        assert msg.id == ident


def test_lock_path_is_beside_the_queue_and_not_created(queue_harness):
    """lock_path names QUEUE.mailrelayd.lock beside the queue, and opening the queue does not create it."""
    queue = queue_harness.open_queue()
    assert queue.lock_path == queue_harness.path.with_name(queue_harness.path.name + ".mailrelayd.lock")
    assert not os.path.lexists(queue.lock_path)
