"""The SQL of the SQLite queue: the tables mailrelayd keeps in Fossil's emailqueue.db, the
temporary views through which one statement records an outcome or puts a message back,
and the statements that find and claim work.

Fossil's `email` and the Tcl script's `sentlog` are created only if missing, with the
exact columns Fossil and email-sender.tcl use; `mailrelayd_queue` and `mailrelayd_failed`
are ours. Nothing else in the file is changed or dropped.

A jail may have written anything into our tables: a value of the wrong type in a time
or an owner counts as "not set" (the claim may take the row back), never as "not yet".
A row whose `next_try` is REFUSED or later was refused unread (over max_size): it stays
in `email`, out of the way, until it is purged.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailrelayd.queues import QueueError

REFUSED = 9.0e15  # next_try of a row refused unread: no clock reaches it
WINDOW = 1000  # the oldest messages whose dead claimers are looked for at each claim

_NUMBER = "typeof({0}) IN ('integer', 'real')"
_DUE = f"(NOT {_NUMBER.format('q.next_try')} OR q.next_try <= :now)"
_FREE = f"(q.owner IS NULL OR NOT {_NUMBER.format('q.lease_until')} OR q.lease_until <= :now)"

CANDIDATES = f"""
SELECT e.emailid FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid
WHERE q.emailid IS NULL OR ({_DUE} AND {_FREE})
ORDER BY e.emailid LIMIT :limit
"""

CLAIM = f"""
INSERT INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, owner, lease_until)
SELECT emailid, 0, :now, :now, :owner, :lease FROM email WHERE emailid IN (SELECT value FROM json_each(:ids))
ON CONFLICT(emailid) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until
WHERE {_DUE.replace("q.", "mailrelayd_queue.")} AND {_FREE.replace("q.", "mailrelayd_queue.")}
"""

CLAIMED = """
SELECT q.emailid, q.attempts, q.first_seen, q.digest, q.recipients
FROM mailrelayd_queue q JOIN email e ON e.emailid = q.emailid
WHERE q.owner = :owner AND q.emailid IN (SELECT value FROM json_each(:ids)) ORDER BY q.emailid
"""

# The owners of claims among the oldest WINDOW messages: the same cost whatever the size.
CLAIMERS = f"""
SELECT DISTINCT q.owner FROM (SELECT emailid FROM email ORDER BY emailid LIMIT {WINDOW}) e
JOIN mailrelayd_queue q ON q.emailid = e.emailid WHERE q.owner IS NOT NULL AND q.owner IS NOT :owner
"""

REFUSE = """
UPDATE mailrelayd_queue SET next_try = :refused, last_try = :now, last_error = :reason, owner = NULL,
    lease_until = NULL WHERE emailid = :emailid
"""

NEXT_DUE = f"""
SELECT min(CASE WHEN q.owner IS NULL THEN q.next_try ELSE q.lease_until END)
FROM mailrelayd_queue q JOIN email e ON e.emailid = q.emailid WHERE q.next_try < {REFUSED}
"""

# One read-only statement (one snapshot, no write lock, no body). `count(*) FROM email`
# reads all of Fossil's table (about 60 ms for 100,000 rows of 2 KB); the search for the
# oldest row not seen yet reads the rows before it (those the relay has seen), at most as
# much again; the rest reads our own small rows. A row of mailrelayd_queue whose message
# another program deleted still counts (as deferred, and for the age) until maintain().
STATS = f"""
SELECT (SELECT count(*) FROM email),
       sum(next_try > :now AND next_try < {REFUSED}),
       min(CASE WHEN next_try > :now AND next_try < {REFUSED} THEN next_try END),
       min(CASE WHEN next_try < {REFUSED} THEN first_seen END),
       (SELECT count(*) FROM mailrelayd_failed),
       (SELECT count(*) FROM sentlog WHERE mtime >= :since),
       (SELECT e.emailid FROM email e WHERE NOT EXISTS (SELECT 1 FROM mailrelayd_queue q WHERE q.emailid = e.emailid)
        ORDER BY e.emailid LIMIT 1),
       sum(next_try >= {REFUSED})
FROM mailrelayd_queue
"""

PRUNE_REFUSED = f"""
DELETE FROM email WHERE emailid IN
    (SELECT emailid FROM mailrelayd_queue WHERE next_try >= {REFUSED} AND coalesce(last_try, 0) < :before)
RETURNING emailid
"""

FORGET_GONE = "DELETE FROM mailrelayd_queue WHERE owner IS NULL AND emailid NOT IN (SELECT emailid FROM email)"
ANY_GONE = ("SELECT EXISTS (SELECT 1 FROM mailrelayd_queue q WHERE q.owner IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM email e WHERE e.emailid = q.emailid))")
# Fossil's email has no AUTOINCREMENT: an id is reused only at the top of the range (for a
# new row once the rows above it are gone). The records of deferred messages there (or all
# of them, at open: :top NULL, no scan of email) are the ones to check against the message they now name.
TOP = 64
DEFERRED_RECORDS = f"""
SELECT q.emailid, q.digest FROM mailrelayd_queue q
WHERE q.digest IS NOT NULL AND q.owner IS NULL AND q.next_try < {REFUSED}
  AND (:top IS NULL OR q.emailid >= coalesce((SELECT emailid FROM email ORDER BY emailid DESC LIMIT 1 OFFSET :top), 0))
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS email(emailid INTEGER PRIMARY KEY, msg TEXT);
CREATE TABLE IF NOT EXISTS sentlog(mtime INT, xto TEXT, xfrom TEXT, xsubject TEXT, xsize INT);
CREATE TABLE IF NOT EXISTS mailrelayd_queue(
    emailid INTEGER PRIMARY KEY,  -- the email row this is the delivery state of
    digest BLOB,                  -- of msg: a reused emailid does not inherit this state
    attempts INT NOT NULL,
    first_seen REAL NOT NULL,
    next_try REAL NOT NULL,
    last_try REAL,
    last_error TEXT,
    owner TEXT,                   -- host:pid:start time of the process delivering it
    lease_until REAL,
    recipients TEXT               -- JSON list: who is still to get it, after a partial send
);
CREATE INDEX IF NOT EXISTS mailrelayd_queue_owner ON mailrelayd_queue(owner);
CREATE TABLE IF NOT EXISTS mailrelayd_failed(
    id INTEGER PRIMARY KEY,
    emailid INT,
    msg BLOB,
    reason TEXT,
    attempts INT,
    first_seen REAL,
    failed_at REAL,
    last_error TEXT,
    recipients TEXT               -- JSON list: who never got it, when others did
);
"""


# Per-connection views: inserting a row into one records an outcome in a single statement.
OUTCOME_VIEWS = """
CREATE TEMP VIEW IF NOT EXISTS mailrelayd_sent(emailid, mtime, xto, xfrom, xsubject, xsize)
    AS SELECT NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
CREATE TEMP TRIGGER IF NOT EXISTS mailrelayd_sent_insert INSTEAD OF INSERT ON mailrelayd_sent BEGIN
    DELETE FROM email WHERE emailid = NEW.emailid;
    DELETE FROM mailrelayd_queue WHERE emailid = NEW.emailid;
    INSERT INTO sentlog(mtime, xto, xfrom, xsubject, xsize)
        SELECT NEW.mtime, NEW.xto, NEW.xfrom, NEW.xsubject, NEW.xsize WHERE NEW.xsize IS NOT NULL;
END;
CREATE TEMP VIEW IF NOT EXISTS mailrelayd_set_aside(emailid, reason, attempts, first_seen, failed_at, recipients)
    AS SELECT NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
CREATE TEMP TRIGGER IF NOT EXISTS mailrelayd_set_aside_insert INSTEAD OF INSERT ON mailrelayd_set_aside BEGIN
    INSERT INTO mailrelayd_failed(emailid, msg, reason, attempts, first_seen, failed_at, last_error, recipients)
        SELECT e.emailid, CAST(e.msg AS BLOB), NEW.reason, NEW.attempts, NEW.first_seen, NEW.failed_at,
               q.last_error, NEW.recipients
        FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid WHERE e.emailid = NEW.emailid;
    DELETE FROM email WHERE emailid = NEW.emailid;
    DELETE FROM mailrelayd_queue WHERE emailid = NEW.emailid;
END;
"""

# Per connection: inserting (failed id, now) into mailrelayd_requeue puts that message back in
# `email` (as text, as Fossil writes it) and deletes its failed row, in one statement. After a
# partial send it also records who is still to get it, so nobody gets it twice.
REQUEUE_VIEW = """
CREATE TEMP TABLE IF NOT EXISTS mailrelayd_requeued(emailid INTEGER);
CREATE TEMP VIEW IF NOT EXISTS mailrelayd_requeue(id, now) AS SELECT NULL, NULL WHERE 0;
CREATE TEMP TRIGGER IF NOT EXISTS mailrelayd_requeue_insert INSTEAD OF INSERT ON mailrelayd_requeue BEGIN
    INSERT INTO email(msg) SELECT CAST(msg AS TEXT) FROM mailrelayd_failed WHERE id = NEW.id;
    INSERT INTO mailrelayd_requeued(emailid) VALUES (last_insert_rowid());
    INSERT OR REPLACE INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, recipients)
        SELECT (SELECT emailid FROM mailrelayd_requeued), 0, NEW.now, NEW.now, recipients
        FROM mailrelayd_failed WHERE id = NEW.id AND recipients IS NOT NULL;
    DELETE FROM mailrelayd_failed WHERE id = NEW.id;
END;
"""


def create_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create Fossil's, the Tcl script's and our tables if missing; change nothing else."""
    email_columns = {row[1] for row in conn.execute("PRAGMA table_info(email)").fetchall()}
    if email_columns and not {"emailid", "msg"} <= email_columns:
        raise QueueError(f"{path}: table email has no emailid and msg columns: not a Fossil email queue")
    conn.executescript(SCHEMA)
    for table in ("mailrelayd_queue", "mailrelayd_failed"):  # files made before partial sends were kept
        if "recipients" not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN recipients TEXT")
    conn.executescript(OUTCOME_VIEWS)
