"""The claim-then-acknowledge contract every queue keeps."""

import os
import subprocess
import sys

from conftest import ROOT, fossil_message

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
