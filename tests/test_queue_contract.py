"""The claim-then-acknowledge contract every queue keeps."""

import os
import subprocess
import sys

from mailrelayd.queues import owner_token
from conftest import fossil_message

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
        queue.mark_sent(msg, None, NOW)
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

    def test_claim_of_a_dead_local_process_is_taken_back_at_once(self, queue_harness):
        """A claim whose owner no longer runs on this host does not wait for its lease."""
        queue_harness.enqueue(fossil_message())
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        queue = queue_harness.open_queue(lease=3600)
        queue.owner = owner_token(int(dead)).replace(":gone", ":12345")
        assert len(queue.claim(NOW, 10)) == 1
        assert len(queue_harness.open_queue().claim(NOW + 1, 10)) == 1

    def test_claim_of_a_live_process_is_kept_until_its_lease_ends(self, queue_harness):
        """A claim by a running process (here, our parent) is only taken after its lease."""
        queue_harness.enqueue(fossil_message())
        holder = queue_harness.open_queue(lease=60)
        holder.owner = owner_token(os.getppid())
        holder.claim(NOW, 10)
        other = queue_harness.open_queue()
        assert other.claim(NOW + 59, 10) == []
        assert len(other.claim(NOW + 60, 10)) == 1
