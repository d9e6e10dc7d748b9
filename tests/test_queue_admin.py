"""The administration half of the queue interface, in process, over both queue kinds.

Queue states are made by real drains through the fake sendmail (the `relay_pass` fixture),
so each test sees exactly what a relay leaves behind.
"""

import os
import time

from conftest import fossil_message
from mailrelayd.relay import Relay
from mailrelayd.transports.pipe import PipeTransport


def deferred(harness, relay_pass, to="bob@example.com"):
    harness.enqueue(fossil_message(to=to, subject=f"Deferred {to}"))
    assert relay_pass(75).exit_status == 75


def failed(harness, relay_pass, to="bob@example.com"):
    harness.enqueue(fossil_message(to=to, subject=f"Failed {to}"))
    assert relay_pass(65).exit_status == 65


def test_entries_by_state(queue_harness, relay_pass):
    """entries() tells new, deferred and failed messages apart."""
    deferred(queue_harness, relay_pass, "a@example.com")
    failed(queue_harness, relay_pass, "b@example.com")
    queue_harness.enqueue(fossil_message(to="c@example.com"))
    queue = queue_harness.open_queue()
    now = time.time()
    states = {e.state: e for e in queue.entries({"new", "deferred", "failed"}, now)}
    assert set(states) == {"new", "deferred", "failed"}
    assert b"a@example.com" in states["deferred"].data and states["deferred"].attempts == 1
    assert "exited 75" in states["deferred"].last_error and states["deferred"].next_try > now
    assert b"b@example.com" in states["failed"].data and "exited 65" in states["failed"].reason
    assert b"c@example.com" in states["new"].data and states["new"].attempts == 0


def test_find_gives_one_message_of_any_state(queue_harness, relay_pass):
    """find() returns the entry whose id entries() gave, and None for an unknown id."""
    failed(queue_harness, relay_pass)
    queue = queue_harness.open_queue()
    [entry] = queue.entries({"failed"}, time.time())
    assert queue.find(entry.id, time.time()) == entry
    assert queue.find("999999", time.time()) is None


def test_make_due_makes_deferred_due(queue_harness, relay_pass):
    """make_due() of a deferred id makes it due, so the next relay_pass sends it."""
    deferred(queue_harness, relay_pass)
    queue = queue_harness.open_queue()
    [entry] = queue.entries({"deferred"}, time.time())
    assert queue.make_due([entry.id], time.time()) == [entry.id]
    assert queue.entries({"deferred"}, time.time()) == []
    assert relay_pass(0).sent == 1 and queue_harness.queued() == 0


def test_make_due_of_all(queue_harness, relay_pass):
    """make_due(None) makes every deferred message due."""
    deferred(queue_harness, relay_pass, "a@example.com")
    deferred(queue_harness, relay_pass, "b@example.com")
    queue = queue_harness.open_queue()
    assert len(queue.make_due(None, time.time())) == 2
    assert queue.stats(time.time()).deferred == 0


def test_make_due_of_unknown_id_changes_nothing(queue_harness, relay_pass):
    """make_due() of an id that is not deferred returns nothing and changes nothing."""
    deferred(queue_harness, relay_pass)
    queue = queue_harness.open_queue()
    assert queue.make_due(["424242"], time.time()) == []
    assert queue.stats(time.time()).deferred == 1


def test_requeue_puts_failed_back_unchanged(queue_harness, relay_pass, fake_sendmail):
    """requeue() puts a failed message back; the next relay_pass sends its bytes unchanged."""
    failed(queue_harness, relay_pass)
    queue = queue_harness.open_queue()
    [entry] = queue.entries({"failed"}, time.time())
    [(old, new)] = queue.requeue([entry.id], time.time())
    assert old == entry.id and new
    assert queue.stats(time.time()).failed == 0 and queue_harness.queued() == 1
    assert relay_pass(0).sent == 1
    assert fake_sendmail.bodies()[-1].replace(b"\r\n", b"\n") == fossil_message(
        subject="Failed bob@example.com").replace(b"\r\n", b"\n")


def test_requeue_of_all_leaves_no_failed_record(queue_harness, relay_pass):
    """requeue(None) puts every failed message back and leaves no reason file or row."""
    failed(queue_harness, relay_pass, "a@example.com")
    failed(queue_harness, relay_pass, "b@example.com")
    queue = queue_harness.open_queue()
    assert len(queue.requeue(None, time.time())) == 2
    assert queue_harness.failed() == [] and queue_harness.queued() == 2


def test_purge_failed_by_age_keeps_recent(queue_harness, relay_pass):
    """purge_failed(None, before) deletes only what was set aside before `before`."""
    failed(queue_harness, relay_pass)
    queue = queue_harness.open_queue()
    assert queue.purge_failed(None, time.time() - 30 * 86400) == []
    [entry] = queue.entries({"failed"}, time.time())
    assert queue.purge_failed(None, time.time() + 1) == [entry.id]
    assert queue_harness.failed() == []


def test_purge_failed_by_id(queue_harness, relay_pass):
    """purge_failed(ids) deletes those failed messages only, however recent."""
    failed(queue_harness, relay_pass, "a@example.com")
    failed(queue_harness, relay_pass, "b@example.com")
    queue = queue_harness.open_queue()
    first, second = queue.entries({"failed"}, time.time())
    assert queue.purge_failed([first.id], 0.0) == [first.id]
    assert [e.id for e in queue.entries({"failed"}, time.time())] == [second.id]


def test_purge_sent_deletes_only_old_records(queue_harness, relay_pass):
    """purge_sent(before) deletes sent records older than `before` only."""
    queue_harness.enqueue(fossil_message())
    options = {"keep_sent": True} if queue_harness.kind == "spool" else {}
    assert relay_pass(0, **options).sent == 1
    queue = queue_harness.open_queue(**options)
    assert queue.purge_sent(time.time() - 86400) == []
    queue_harness.age_sent_records(2 * 86400)
    assert len(queue.purge_sent(time.time() - 86400)) == 1


def test_refused_entries_are_listed_and_purged(spool_harness, fake_sendmail):
    """A spool entry refused unread is an entry of state refused, with its reason, until purged."""
    (spool_harness.path / "empty.email").write_bytes(b"")
    os.utime(spool_harness.path / "empty.email", (time.time() - 3600,) * 2)
    transport = PipeTransport((str(fake_sendmail.path), "-ti"), 10.0, frozenset())
    Relay(spool_harness.open_queue(settle=0), transport).drain()
    queue = spool_harness.open_queue()
    [entry] = queue.entries({"refused"}, time.time())
    assert (entry.id, entry.state, entry.data) == ("empty.email", "refused", b"")
    assert "empty file" in entry.reason
    assert queue.purge_refused(time.time() + 1) == ["empty.email"]
    assert queue.entries({"refused"}, time.time()) == []


def test_entry_of_injected_message_has_its_envelope(spool_harness):
    """A file from mailrelayd-sendmail is an entry with its recorded sender and recipients."""
    from mailrelayd.inject import enqueue

    enqueue(str(spool_harness.path), "trac@example.org", ["hidden@example.org"], b"To: shown@example.org\n\nbody\n")
    [entry] = spool_harness.open_queue().entries({"new"}, time.time())
    assert (entry.sender, entry.recipients) == ("trac@example.org", ("hidden@example.org",))
    assert entry.data == b"To: shown@example.org\n\nbody\n"


def test_new_spool_file_that_would_be_refused_is_not_read(spool_harness, tmp_path):
    """An entry the relay would refuse (a hard link to a file outside) is listed unread, with why."""
    outside = tmp_path / "outside"
    outside.write_bytes(fossil_message(body="OUTSIDE-ONLY\r\n"))
    os.link(outside, spool_harness.path / "linked.email")
    [entry] = spool_harness.open_queue().entries({"new"}, time.time())
    assert entry.data == b"" and "hard link" in entry.last_error
