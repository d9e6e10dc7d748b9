"""The tables mailrelayd keeps in Fossil's emailqueue.db, and the temporary views through
which one statement records an outcome or puts a message back.

Fossil's `email` and the Tcl script's `sentlog` are created only if missing, with the
exact columns Fossil and email-sender.tcl use; `mailrelayd_queue` and `mailrelayd_failed`
are ours. Nothing else in the file is changed or dropped.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailrelayd.queues import QueueError

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
