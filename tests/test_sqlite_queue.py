"""What is particular to Fossil's SQLite file: schema, compatibility, bad files."""

import os
import sqlite3

import pytest

from mailrelayd.message import read_envelope
from mailrelayd.queues import QueueError, owner_token
from mailrelayd.queues.sqlite import SqliteQueue
from conftest import SqliteHarness, fossil_message

NOW = 1_800_000_000.0


def columns(path, table):
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def test_open_sets_wal_and_creates_tcl_script_tables(tmp_path):
    """Opening sets WAL and creates sentlog exactly as email-sender.tcl does."""
    harness = SqliteHarness(tmp_path / "q.db")
    queue = harness.open_queue()
    assert queue.journal_mode == "wal"
    assert columns(harness.path, "sentlog") == ["mtime", "xto", "xfrom", "xsubject", "xsize"]
    assert columns(harness.path, "email") == ["emailid", "msg"]


def test_sent_message_gets_a_sentlog_row(tmp_path):
    """Each sent message is logged in sentlog with To, From, Subject and size."""
    harness = SqliteHarness(tmp_path / "q.db")
    data = fossil_message(to="bob@example.com", subject="Hi", sender="noreply@example.org")
    harness.enqueue(data)
    queue = harness.open_queue()
    [msg] = queue.claim(NOW, 1)
    queue.mark_sent([(msg, read_envelope(data))], NOW)
    with sqlite3.connect(harness.path) as conn:
        rows = conn.execute("SELECT mtime, xto, xfrom, xsubject, xsize FROM sentlog").fetchall()
    assert rows == [(int(NOW), "bob@example.com", "noreply@example.org", "Hi", len(data))]


def test_maintain_prunes_old_sentlog_rows_only(tmp_path):
    """Sentlog rows older than the retention go; newer ones stay."""
    harness = SqliteHarness(tmp_path / "q.db")
    queue = harness.open_queue()
    with sqlite3.connect(harness.path) as conn:
        conn.executemany("INSERT INTO sentlog(mtime, xto) VALUES (?, ?)",
                         [(int(NOW - 31 * 86400), "old"), (int(NOW - 29 * 86400), "new")])
    queue.maintain(NOW)
    with sqlite3.connect(harness.path) as conn:
        assert conn.execute("SELECT xto FROM sentlog").fetchall() == [("new",)]


def test_existing_rows_and_tables_are_left_alone(tmp_path):
    """A file the Tcl script used keeps its rows and schema; only our tables are added."""
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE email(emailid INTEGER PRIMARY KEY, msg TEXT)")
        conn.execute("CREATE TABLE sentlog(mtime INT, xto TEXT, xfrom TEXT, xsubject TEXT, xsize INT)")
        conn.execute("INSERT INTO sentlog VALUES (1, 'a', 'b', 'c', 4)")
    SqliteHarness(path).open_queue()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT * FROM sentlog").fetchall() == [(1, "a", "b", "c", 4)]


def test_reused_emailid_starts_with_fresh_attempts(tmp_path):
    """If another program removed a deferred row and Fossil reused its id, history is not inherited."""
    harness = SqliteHarness(tmp_path / "q.db")
    harness.enqueue(fossil_message(subject="first"))
    queue = harness.open_queue()
    [msg] = queue.claim(NOW, 1)
    queue.defer(msg, "busy", NOW, NOW)
    with sqlite3.connect(harness.path) as conn:
        conn.execute("DELETE FROM email")  # as email-sender.tcl would after sending it
    harness.enqueue(fossil_message(subject="second"))
    [fresh] = queue.claim(NOW + 1, 1)
    assert b"second" in fresh.data and fresh.attempts == 0


def test_missing_file_is_not_created(tmp_path):
    """A queue path that does not exist is an error, and no file is made there."""
    with pytest.raises(QueueError, match="no such file"):
        SqliteQueue(tmp_path / "nope.db", lease=60, sentlog_retention=0).open()
    assert not (tmp_path / "nope.db").exists()


def test_file_that_is_not_sqlite_is_refused(tmp_path):
    """A file of another kind gives a clear error and is not changed."""
    path = tmp_path / "q.db"
    path.write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(QueueError, match="not a SQLite database"):
        SqliteQueue(path, lease=60, sentlog_retention=0).open()
    assert path.read_bytes() == b"this is not a database\n" * 100


def test_foreign_email_table_is_refused(tmp_path):
    """A database whose email table is not Fossil's is not mistaken for a queue."""
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE email(id INTEGER PRIMARY KEY, address TEXT)")
    with pytest.raises(QueueError, match="not a Fossil email queue"):
        SqliteQueue(path, lease=60, sentlog_retention=0).open()


def test_replaced_file_is_followed(tmp_path):
    """If the queue file is deleted and made anew, new messages in the new file are claimed."""
    harness = SqliteHarness(tmp_path / "q.db")
    queue = harness.open_queue()
    for leftover in tmp_path.glob("q.db*"):
        leftover.unlink()
    fresh = SqliteHarness(tmp_path / "q.db")
    fresh.enqueue(fossil_message(subject="after"))
    [msg] = queue.claim(NOW, 10)
    assert b"Subject: after" in msg.data


def test_claim_of_a_live_process_is_kept_until_its_lease_ends(tmp_path):
    """A claim by a running process (here, our parent) is only taken after its lease."""
    harness = SqliteHarness(tmp_path / "q.db")
    harness.enqueue(fossil_message())
    holder = harness.open_queue(lease=60)
    holder.owner = owner_token(os.getppid())
    holder.claim(NOW, 10)
    other = harness.open_queue()
    assert other.claim(NOW + 59, 10) == []
    assert len(other.claim(NOW + 60, 10)) == 1


def test_many_sent_messages_are_recorded_in_one_statement(tmp_path):
    """Several sent messages leave the queue together, each with its sentlog row."""
    harness = SqliteHarness(tmp_path / "q.db")
    for i in range(5):
        harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    queue = harness.open_queue()
    claimed = queue.claim(NOW, 10)
    queue.mark_sent([(m, read_envelope(m.data)) for m in claimed], NOW)
    with sqlite3.connect(harness.path) as conn:
        assert conn.execute("SELECT count(*) FROM email").fetchone()[0] == 0
        assert sorted(r[0] for r in conn.execute("SELECT xto FROM sentlog")) == [f"u{i}@example.com" for i in range(5)]


def test_a_reused_emailid_is_sent_at_once_not_held_by_the_old_deferral(tmp_path):
    """Fossil reuses an id once the table emptied: the new message is due at once, its old record dropped."""
    harness = SqliteHarness(tmp_path / "q.db")
    harness.enqueue(fossil_message(subject="first"))
    queue = harness.open_queue()
    [msg] = queue.claim(NOW, 1)
    queue.defer(msg, "busy", NOW + 3600, NOW)  # held for an hour
    with sqlite3.connect(harness.path) as conn:
        conn.execute("DELETE FROM email")  # as email-sender.tcl, or an administrator, would
    assert harness.enqueue(fossil_message(subject="second")) == msg.id
    [fresh] = queue.claim(NOW + 1, 1)
    assert b"second" in fresh.data and (fresh.attempts, fresh.first_seen) == (0, NOW + 1)


def test_the_record_of_a_message_removed_by_another_program_goes_at_once(tmp_path):
    """A deferred message deleted by someone else leaves no record behind at the next claim (not at the hourly maintenance)."""
    harness = SqliteHarness(tmp_path / "q.db")
    harness.enqueue(fossil_message())
    queue = harness.open_queue()
    [msg] = queue.claim(NOW, 1)
    queue.defer(msg, "busy", NOW + 3600, NOW)
    with sqlite3.connect(harness.path) as conn:
        conn.execute("DELETE FROM email")
    assert queue.claim(NOW + 1, 1) == []
    assert harness.deferred() == []


def test_a_drain_checks_every_deferred_record_against_its_message(tmp_path):
    """A drain from cron, opening a file where ids were reused while it did not run, finds the new messages due."""
    harness = SqliteHarness(tmp_path / "q.db")
    for i in range(100):
        harness.enqueue(fossil_message(subject=f"old {i}"))
    queue = harness.open_queue()
    for msg in queue.claim(NOW, 100):
        queue.defer(msg, "busy", NOW + 3600, NOW)
    queue.close()
    with sqlite3.connect(harness.path) as conn:
        conn.execute("DELETE FROM email")
        for i in range(100):
            conn.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (fossil_message(subject=f"new {i}"),))
    assert len(harness.open_queue().claim(NOW + 1, 100)) == 100
