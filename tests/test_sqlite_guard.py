"""The SQLite file belongs to a jail: what mailrelayd refuses in it, and what it survives."""

import os
import socket
import sqlite3
import threading
import time

import pytest

from conftest import SqliteHarness, fossil_message
from mailrelayd.queues import QueueError
from mailrelayd.queues.sqlite import SqliteQueue

NOW = time.time()


def snapshot(path):
    """The bytes of a file and of every file beside it: to prove nothing was written."""
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.is_file()}


def other_jails_repository(tmp_path):
    """An SQLite file outside the attacker's jail (another jail's repo.fossil)."""
    outside = tmp_path / "other-jail"
    outside.mkdir()
    repo = outside / "repo.fossil"
    with sqlite3.connect(repo) as conn:
        conn.execute("CREATE TABLE blob(rid INTEGER PRIMARY KEY, content BLOB)")
        conn.execute("INSERT INTO blob(content) VALUES (x'00ff')")
    return repo


def test_a_symlinked_queue_is_refused_and_its_target_untouched(tmp_path):
    """emailqueue.db as a symlink to another jail's repository: refused with one line, nothing written there."""
    repo = other_jails_repository(tmp_path)
    before = snapshot(repo)
    jail = tmp_path / "jail"
    jail.mkdir()
    os.symlink(repo, jail / "emailqueue.db")
    with pytest.raises(QueueError, match="symbolic link"):
        SqliteQueue(jail / "emailqueue.db", lease=60, sentlog_retention=86400).open()
    assert snapshot(repo) == before


def test_a_hard_linked_queue_is_refused_and_untouched(tmp_path):
    """emailqueue.db as a hard link to another file: refused, nothing written."""
    repo = other_jails_repository(tmp_path)
    before = snapshot(repo)
    os.link(repo, tmp_path / "emailqueue.db")
    with pytest.raises(QueueError, match="hard links"):
        SqliteQueue(tmp_path / "emailqueue.db", lease=60, sentlog_retention=86400).open()
    assert snapshot(repo) == before


@pytest.mark.parametrize("ddl, named", [
    ("CREATE TRIGGER spin AFTER INSERT ON email BEGIN SELECT 1; END", "trigger 'spin'"),
    ("CREATE VIEW mailrelayd_sent AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
     "SELECT i FROM n", "view 'mailrelayd_sent'"),
    ("CREATE TABLE extra(x)", "table 'extra'"),
    ("CREATE VIRTUAL TABLE sentlog USING fts4(mtime, xto, xfrom, xsubject, xsize)", "virtual table"),
    ("CREATE INDEX slow ON email(length(msg))", "index 'slow'"),
])
def test_a_schema_with_anything_not_fossils_or_ours_is_refused_unchanged(tmp_path, ddl, named):
    """A trigger, a view, a virtual table, a table or an index that is not Fossil's or mailrelayd's refuses the queue, naming it; nothing is written."""
    harness = SqliteHarness(tmp_path / "emailqueue.db")
    with sqlite3.connect(harness.path) as conn:
        conn.execute(ddl)
    before = snapshot(harness.path)
    with pytest.raises(QueueError, match=named):
        SqliteQueue(harness.path, lease=60, sentlog_retention=86400).open()
    assert snapshot(harness.path) == before


def test_a_virtual_table_with_disguised_text_is_refused(tmp_path):
    """A virtual table whose stored CREATE text a jail rewrote (a comment before VIRTUAL) is still known by having no pages."""
    harness = SqliteHarness(tmp_path / "emailqueue.db")
    with sqlite3.connect(harness.path) as conn:
        conn.execute("CREATE VIRTUAL TABLE sentlog USING fts4(mtime, xto, xfrom, xsubject, xsize)")
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_schema SET sql = 'CREATE /* plain */ VIRTUAL TABLE sentlog USING"
                     " fts4(mtime, xto, xfrom, xsubject, xsize)' WHERE name = 'sentlog'")
    before = snapshot(harness.path)
    with pytest.raises(QueueError, match="'sentlog' is a virtual table"):
        SqliteQueue(harness.path, lease=60, sentlog_retention=86400).open()
    assert snapshot(harness.path) == before


def test_a_virtual_table_disguised_in_text_and_rootpage_is_refused(tmp_path):
    """A virtual table given a plain-looking CREATE text and a page number of its own is still refused, the file unchanged."""
    harness = SqliteHarness(tmp_path / "emailqueue.db")
    with sqlite3.connect(harness.path) as conn:
        conn.execute("CREATE VIRTUAL TABLE sentlog USING fts4(mtime, xto, xfrom, xsubject, xsize)")
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_schema SET rootpage = 2, sql = 'CREATE /* plain */ VIRTUAL TABLE sentlog USING"
                     " fts4(mtime, xto, xfrom, xsubject, xsize)' WHERE name = 'sentlog'")
    before = snapshot(harness.path)
    with pytest.raises(QueueError, match="'sentlog'.*refused"):
        SqliteQueue(harness.path, lease=60, sentlog_retention=86400).open()
    assert snapshot(harness.path) == before


def test_a_generated_column_in_email_is_refused(tmp_path):
    """An email table whose msg is computed (zeroblob of a gigabyte, say) is not Fossil's."""
    path = tmp_path / "emailqueue.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE email(emailid INTEGER PRIMARY KEY, raw TEXT,"
                     " msg TEXT GENERATED ALWAYS AS (zeroblob(900000000)))")
    with pytest.raises(QueueError, match="not a Fossil email queue"):
        SqliteQueue(path, lease=60, sentlog_retention=86400).open()


def test_a_message_over_max_size_is_refused_unread_and_kept(sqlite_harness):
    """A row larger than max_size is never read: it stays in email, counted and listed as refused, until purged."""
    sqlite_harness.enqueue(fossil_message(body="x" * 50_000))
    small = sqlite_harness.enqueue(fossil_message(subject="small"))
    queue = SqliteQueue(sqlite_harness.path, lease=60, sentlog_retention=86400, max_size=10_000)
    queue.open()
    assert [m.id for m in queue.claim(NOW, 10)] == [small]
    stats = queue.stats(NOW)
    assert (stats.refused, stats.queued) == (1, 1) and sqlite_harness.queued() == 2
    [refused] = queue.entries({"refused"}, NOW)
    assert "over max_size (10000)" in refused.reason and refused.size > 50_000
    assert refused.data.startswith(b"To: ") and len(refused.data) <= 64 * 1024
    assert queue.purge_refused(NOW + 1) == [refused.id]
    assert sqlite_harness.queued() == 1


def test_values_longer_than_max_size_are_never_loaded(sqlite_harness):
    """Every connection caps the length of a value, so no statement can load a huge one."""
    sqlite_harness.enqueue(b"x" * 200_000)
    queue = SqliteQueue(sqlite_harness.path, lease=60, sentlog_retention=86400, max_size=10_000)
    queue.open()
    with pytest.raises(sqlite3.DataError):
        queue._db.execute("SELECT msg FROM email").fetchall()


@pytest.mark.parametrize("column, value", [("attempts", "'many'"), ("recipients", "'{not json'"),
                                            ("recipients", "'[\"|/bin/sh\"]'"), ("first_seen", "x'00'"),
                                            ("owner", "x'deadbeef'"), ("next_try", "'soon'")])
def test_a_bad_record_of_ours_starts_the_message_afresh(sqlite_harness, column, value):
    """A row of mailrelayd_queue the jail rewrote (a text count, bad JSON, a blob owner) is repaired: the message is claimed afresh."""
    emailid = sqlite_harness.enqueue(fossil_message())
    queue = sqlite_harness.open_queue()
    with sqlite3.connect(sqlite_harness.path) as conn:
        conn.execute("INSERT INTO mailrelayd_queue(emailid, attempts, first_seen, next_try) VALUES (?, 3, ?, ?)",
                     (emailid, NOW - 60, NOW - 1))
        conn.execute(f"UPDATE mailrelayd_queue SET {column} = {value}")
    [msg] = queue.claim(NOW, 10)
    assert msg.id == emailid and msg.envelope is None
    assert (msg.attempts, msg.first_seen) == ((0, NOW) if column in ("attempts", "recipients", "first_seen")
                                              else (3, NOW - 60))


def test_many_dead_claimers_cost_one_small_window(sqlite_harness):
    """Of fifty thousand rows claimed by dead processes only the oldest window is looked at: the claim costs the same however many there are, and the oldest message goes."""
    first = sqlite_harness.enqueue(fossil_message(subject="first"))
    queue = sqlite_harness.open_queue()
    with sqlite3.connect(sqlite_harness.path) as conn:
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000)"
                     " INSERT INTO email(msg) SELECT 'x' FROM n")
        conn.execute("INSERT INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, owner, lease_until)"
                     " SELECT emailid, 0, ?1, ?1, ?2 || ':' || (5000000 + emailid) || ':1', ?1 + 3600 FROM email",
                     (NOW, socket.gethostname()))  # pids above any pid_max: gone
    claimed = queue.claim(NOW, 1)
    assert [m.id for m in claimed] == [first]
    with sqlite3.connect(sqlite_harness.path) as conn:
        freed = conn.execute("SELECT count(*) FROM mailrelayd_queue WHERE owner IS NULL").fetchone()[0]
    assert 0 < freed <= 1000


def test_a_statement_over_sql_timeout_is_aborted(sqlite_harness):
    """A claim that would scan a huge table for long is aborted at sql_timeout, with the reason: the queue waits, the process does not."""
    queue = SqliteQueue(sqlite_harness.path, lease=60, sentlog_retention=86400, sql_timeout=0.1)
    queue.open()  # on a small table: opening does not race the deadline on a loaded machine
    with sqlite3.connect(sqlite_harness.path) as conn:
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000)"
                     " INSERT INTO email(msg) SELECT 'x' FROM n")
        conn.execute("INSERT INTO mailrelayd_queue(emailid, attempts, first_seen, next_try)"
                     " SELECT emailid, 1, ?1, ?1 + 3600 FROM email", (NOW,))
    with pytest.raises(QueueError, match="sql_timeout"):
        queue.stats(NOW)


def test_interrupt_cuts_a_long_statement_short(sqlite_harness):
    """A stop asked for from another thread aborts the statement running now within about half a second."""
    with sqlite3.connect(sqlite_harness.path) as conn:
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000)"
                     " INSERT INTO email(msg) SELECT 'x' FROM n")
    queue = SqliteQueue(sqlite_harness.path, lease=60, sentlog_retention=86400, sql_timeout=600)
    queue.open()
    timer = threading.Timer(0.05, queue.interrupt)
    timer.start()
    with pytest.raises(QueueError, match="aborted"):
        with queue._errors():
            queue._db.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
                              ).fetchall()
    timer.join()


def test_a_trigger_added_after_the_queue_was_opened_stops_its_claims(sqlite_harness):
    """The schema is looked at again whenever it changes: a trigger the jail adds later refuses the next claim, before it can fire."""
    sqlite_harness.enqueue(fossil_message())
    queue = sqlite_harness.open_queue()
    with sqlite3.connect(sqlite_harness.path) as conn:
        conn.execute("CREATE TRIGGER later AFTER DELETE ON email BEGIN SELECT 1; END")
    with pytest.raises(QueueError, match="trigger 'later'"):
        queue.claim(NOW, 10)
