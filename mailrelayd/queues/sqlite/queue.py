"""Fossil's SQLite queue (email-send-method=db): table `email(emailid, msg)`.

Works on the file exactly as Fossil and email-sender.tcl leave it, adding only tables of
its own: `mailrelayd_queue` (attempts, next try, last error and the claim of each
message it has seen), `mailrelayd_failed` (messages set aside, with the reason) and
`sentlog` (the Tcl script's log of sent mail, kept with the same meaning).

Fossil gives up on an insert after about a second of SQLITE_BUSY, so every write here
is a single SQL statement in autocommit mode: SQLite takes the write lock and releases
it within one call, with no Python code (which may wait for the GIL while worker threads
spawn processes) running in between. Outcomes that change several tables go through
temporary views whose INSTEAD OF triggers do the work inside that one statement. Bodies
are read outside any write transaction (WAL lets Fossil write meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from pathlib import Path

from mailrelayd.message import Envelope, date_header
from mailrelayd.queues import Entry, QueuedMessage, QueueError, QueueStats, owner_is_gone, owner_token
from mailrelayd.queues.sqlite import admin
from mailrelayd.queues.sqlite.schema import create_schema

BUSY_TIMEOUT = 5.0  # seconds any statement waits for another process's lock

_CANDIDATES = """
SELECT e.emailid FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid
WHERE q.emailid IS NULL OR (q.next_try <= :now AND (q.owner IS NULL OR q.lease_until <= :now))
ORDER BY e.emailid LIMIT :limit
"""

_CLAIM = """
INSERT INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, owner, lease_until)
SELECT emailid, 0, ?1, ?1, ?2, ?3 FROM email WHERE emailid IN ({ids})
ON CONFLICT(emailid) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until
WHERE mailrelayd_queue.next_try <= ?1
  AND (mailrelayd_queue.owner IS NULL OR mailrelayd_queue.lease_until <= ?1)
"""

_CLAIMED = """
SELECT q.emailid, q.attempts, q.first_seen, q.digest, q.recipients, CAST(e.msg AS BLOB)
FROM mailrelayd_queue q JOIN email e ON e.emailid = q.emailid
WHERE q.owner = ?1 AND q.emailid IN ({ids}) ORDER BY q.emailid
"""

_NEXT_DUE = """
SELECT min(CASE WHEN q.owner IS NULL THEN q.next_try ELSE q.lease_until END)
FROM mailrelayd_queue q JOIN email e ON e.emailid = q.emailid
"""

# One read-only statement (one snapshot, no write lock, no body). `count(*) FROM email`
# reads all of Fossil's table (about 60 ms for 100,000 rows of 2 KB); the search for the
# oldest row not seen yet reads the rows before it (those the relay has seen), at most as
# much again; the rest reads our own small rows. A row of mailrelayd_queue whose message
# another program deleted still counts (as deferred, and for the age) until maintain().
_STATS = """
SELECT (SELECT count(*) FROM email),
       sum(next_try > :now), min(CASE WHEN next_try > :now THEN next_try END), min(first_seen),
       (SELECT count(*) FROM mailrelayd_failed),
       (SELECT count(*) FROM sentlog WHERE mtime >= :since),
       (SELECT e.emailid FROM email e WHERE NOT EXISTS (SELECT 1 FROM mailrelayd_queue q WHERE q.emailid = e.emailid)
        ORDER BY e.emailid LIMIT 1)
FROM mailrelayd_queue
"""


class SqliteQueue:
    """The queue in one SQLite file. `lease` bounds how long a claim by a process on
    another host (which cannot be checked for life) keeps others off a message."""

    def __init__(self, path: Path, lease: float, sentlog_retention: float):
        self.path = path
        self.name = str(path)
        self.watch_dir = path.parent
        self.lock_path = path.absolute().with_name(path.name + ".mailrelayd.lock")
        self.lease = lease
        self.sent_record: str | None = "sent log entries"
        self.sentlog_retention = sentlog_retention
        self.owner = owner_token()
        self._conn: sqlite3.Connection | None = None
        self._watched = {path.name, path.name + "-wal", path.name + "-journal"}

    # -- opening -----------------------------------------------------------------

    def open(self) -> None:
        """Open the file (never create it), set WAL and create what is missing.

        Switching a file to WAL does not wait for a writer the way other statements do
        (SQLite answers "database is locked" at once), so the set-up is retried on the same
        connection every 10 ms, for up to BUSY_TIMEOUT, while another process, such as
        Fossil mid-insert, holds the lock. Between tries no lock is held, so Fossil's own
        commit, which retries every 10 ms, never waits on this one.
        """
        if self._conn is not None:
            return
        if not self.path.exists():
            raise QueueError(f"{self.path}: no such file")
        deadline = time.monotonic() + BUSY_TIMEOUT
        conn = None
        try:
            conn = sqlite3.connect(self.path.absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None,
                                   timeout=BUSY_TIMEOUT)
            while True:
                try:
                    self._set_up(conn)
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
        except BaseException as e:
            if conn is not None:
                conn.close()
            if not isinstance(e, sqlite3.DatabaseError):
                raise
            if "not a database" in str(e):
                raise QueueError(f"{self.path}: not a SQLite database") from None
            raise QueueError(f"{self.path}: {e}") from None
        self._conn = conn
        self._inode = self._path_inode()

    def _set_up(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchall()[0][0] != "wal":
            self.journal_mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
        else:
            self.journal_mode = "wal"
        conn.execute("PRAGMA synchronous=NORMAL")
        create_schema(conn, self.path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def notice(self, kind: str, path: str) -> bool:
        return Path(path).name in self._watched

    # -- claim and acknowledge ----------------------------------------------------

    def claim(self, now: float, limit: int) -> list[QueuedMessage]:
        if self._path_inode() != self._inode:  # the file was replaced: follow the path
            self.close()
            self.open()
        with self._errors():
            self._take_back_from_gone()
            for _ in range(10):  # another relay may take our candidates first: look again
                ids = [row[0] for row in self._db.execute(_CANDIDATES, {"now": now, "limit": limit}).fetchall()]
                if not ids:
                    return []
                marks = ",".join("?" * len(ids))  # numbered after ?1..?3
                self._db.execute(_CLAIM.format(ids=marks), (now, self.owner, now + self.lease, *ids))
                rows = self._db.execute(_CLAIMED.format(ids=marks), (self.owner, *ids)).fetchall()
                if rows:
                    return [self._message(*row) for row in rows]
        return []

    def add(self, data: bytes, now: float) -> str:
        """One new row in `email`, stored as Fossil stores it (the bytes bound as text)."""
        with self._errors():
            return str(self._db.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (data,)).lastrowid)

    def stats(self, now: float) -> QueueStats:
        """The counts, from read-only statements. A row the relay has not seen yet is as old
        as its Date: (read from the header of the oldest such row only), else the file's mtime."""
        with self._errors():
            total, deferred, next_try, oldest, failed, sent, unseen = self._db.execute(
                _STATS, {"now": now, "since": now - 86400}).fetchone()
            if unseen is not None:
                row = self._db.execute("SELECT CAST(substr(msg, 1, 16384) AS BLOB) FROM email WHERE emailid = ?",
                                       (unseen,)).fetchone()
                since = date_header(row[0] or b"", now) if row else None
                if since is None:
                    try:
                        since = self.path.stat().st_mtime
                    except OSError:
                        since = now
                oldest = since if oldest is None else min(oldest, since)
        deferred = deferred or 0
        return QueueStats(queued=max(0, total - deferred), deferred=deferred, failed=failed, sent_24h=sent,
                          oldest_queued_s=None if oldest is None else max(0.0, now - oldest), next_try=next_try)

    def _message(self, emailid: int, attempts: int, first_seen: float, digest: bytes | None,
                 recipients: str | None, data: bytes | None) -> QueuedMessage:
        data = data or b""
        if digest is not None and digest != _digest(data):
            attempts, recipients = 0, None  # the emailid was reused after ours left the queue
        envelope = ("", tuple(json.loads(recipients))) if recipients else None
        return QueuedMessage(id=emailid, data=data, attempts=attempts, first_seen=first_seen, envelope=envelope,
                             partial=envelope is not None)

    def mark_sent(self, sent: list[tuple[QueuedMessage, Envelope | None]], now: float) -> None:
        rows = [
            (msg.id, int(now), *((e.to_header, e.from_address, e.subject, e.size) if e else (None,) * 4))
            for msg, e in sent
        ]
        with self._errors():
            for start in range(0, len(rows), 1000):  # one statement: one short write lock for all
                chunk = rows[start:start + 1000]
                self._db.execute("INSERT INTO mailrelayd_sent VALUES " + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
                                 [value for row in chunk for value in row])

    def defer(self, msg: QueuedMessage, error: str, next_try: float, now: float,
              recipients: tuple[str, ...] | None = None) -> None:
        with self._errors():
            self._db.execute(
                "UPDATE mailrelayd_queue SET attempts = ?, next_try = ?, last_try = ?, last_error = ?,"
                " digest = ?, recipients = coalesce(?, recipients), owner = NULL, lease_until = NULL"
                " WHERE emailid = ?",
                (msg.attempts + 1, next_try, now, error, _digest(msg.data), _json(recipients), msg.id),
            )

    def set_aside(self, msg: QueuedMessage, reason: str, now: float,
                  recipients: tuple[str, ...] | None = None) -> None:
        with self._errors():
            self._db.execute("INSERT INTO mailrelayd_set_aside VALUES (?, ?, ?, ?, ?, ?)",
                             (msg.id, reason, msg.attempts + 1, msg.first_seen, now, _json(recipients)))

    def release(self, msgs: list[QueuedMessage]) -> None:
        with self._errors():
            self._db.execute(
                f"UPDATE mailrelayd_queue SET owner = NULL, lease_until = NULL"
                f" WHERE owner = ? AND emailid IN ({','.join('?' * len(msgs))})",
                (self.owner, *(m.id for m in msgs)),
            )

    def next_due(self, now: float) -> float | None:
        with self._errors():
            return self._db.execute(_NEXT_DUE).fetchall()[0][0]

    def settles_at(self, now: float) -> float | None:
        return None  # a row is complete once Fossil's transaction commits

    def maintain(self, now: float) -> None:
        """Prune old sentlog rows and state left behind by messages another program removed."""
        with self._errors():
            self._db.execute("DELETE FROM sentlog WHERE mtime < ?", (int(now - self.sentlog_retention),))
            self._db.execute(
                "DELETE FROM mailrelayd_queue WHERE owner IS NULL"
                " AND emailid NOT IN (SELECT emailid FROM email)"
            )

    # -- administration (mailrelayd list, show, retry, purge) ------------------------

    def entries(self, states: Collection[str], now: float) -> list[Entry]:
        with self._errors():
            return admin.entries(self._db, self.path, states, now)

    def find(self, ident: str, now: float) -> Entry | None:
        with self._errors():
            found = admin.entries(self._db, self.path, {"new", "deferred", "failed"}, now, only=ident)
        return found[0] if found else None

    def make_due(self, ids: Sequence[str] | None, now: float) -> list[str]:
        with self._errors():
            return admin.make_due(self._db, ids, now)

    def requeue(self, ids: Sequence[str] | None, now: float) -> list[tuple[str, str]]:
        with self._errors():
            return admin.requeue(self._db, ids, now)

    def purge_failed(self, ids: Sequence[str] | None, before: float) -> list[str]:
        with self._errors():
            return admin.purge_failed(self._db, ids, before)

    def purge_sent(self, before: float) -> list[str]:
        with self._errors():
            return admin.purge_sent(self._db, before)

    def purge_refused(self, before: float) -> list[str]:
        return []  # a row is never refused unread

    def rescan(self) -> None:
        pass  # nothing is kept in memory

    def sent_times(self, since: float, limit: int) -> list[float]:
        with self._errors():
            rows = self._db.execute("SELECT mtime FROM sentlog WHERE mtime >= ? ORDER BY mtime DESC LIMIT ?",
                                    (int(since), limit)).fetchall()
        return [float(t) for (t,) in rows if isinstance(t, int | float)]

    # -- helpers ----------------------------------------------------------------

    def _path_inode(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _take_back_from_gone(self) -> None:
        owners = [
            owner
            for (owner,) in self._db.execute(
                "SELECT DISTINCT owner FROM mailrelayd_queue WHERE owner IS NOT NULL AND owner != ?", (self.owner,)
            ).fetchall()
            if owner_is_gone(owner)
        ]
        if owners:
            self._db.execute(
                "UPDATE mailrelayd_queue SET owner = NULL, lease_until = NULL"
                f" WHERE owner IN ({','.join('?' * len(owners))})",
                owners,
            )

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueError(f"{self.path}: not open")
        return self._conn

    @contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.Error as e:
            raise QueueError(f"{self.path}: {e}") from None


def _json(recipients: tuple[str, ...] | None) -> str | None:
    return json.dumps(list(recipients)) if recipients is not None else None


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
