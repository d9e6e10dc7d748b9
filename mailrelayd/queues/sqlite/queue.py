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
are read outside any write transaction (WAL lets Fossil write meanwhile), through the
incremental blob API: a body's size is known before a byte of it is read.

The file belongs to a jail (see guard.py): it is checked before anything is written to
it, every statement has a deadline (`sql_timeout`), and what is read back of our own
tables is checked where it enters (queues/stored.py).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from pathlib import Path

from mailrelayd.log import get_logger
from mailrelayd.message import Envelope, date_header
from mailrelayd.queues import Entry, QueuedMessage, QueueError, QueueStats, owner_is_gone, owner_token, stored
from mailrelayd.queues.sqlite import admin, guard, reader
from mailrelayd.queues.sqlite import schema as sql
from mailrelayd.throttle import Throttle

BUSY_TIMEOUT = 5.0  # seconds any statement waits for another process's lock
HURRY = 0.5  # seconds a statement may still run once a stop was asked for
PEEK = 64 * 1024  # bytes of a refused message kept readable for `show`
# Claims look for stale records and dead claimers each time, but while each leaves due
# messages behind (a backlog, claims many times a second) only this often, in seconds.
TIDY_EVERY = 0.25


class SqliteQueue:
    """The queue in one SQLite file. `lease` bounds how long a claim by a process on
    another host (which cannot be checked for life) keeps others off a message; a body
    over `max_size` is refused unread; a statement running longer than `sql_timeout` is
    aborted, and the queue is unavailable for a while."""

    def __init__(self, path: Path, lease: float, sentlog_retention: float, *, max_size: int = 25 * 2**20,
                 sql_timeout: float = 2.0, refused_retention: float = 30 * 86400):
        self.path = path
        self.name = str(path)
        self.watch_dir = path.parent
        self.lock_path = path.absolute().with_name(path.name + ".mailrelayd.lock")
        self.lease = lease
        self.sent_record: str | None = "sent log entries"
        self.sentlog_retention = sentlog_retention
        self.refused_retention = refused_retention
        self.refused = 0
        self.max_size = max_size
        self.sql_timeout = sql_timeout
        self.owner = owner_token()
        self.log = get_logger(queue=self.name)
        self._conn: sqlite3.Connection | None = None
        self._watched = {path.name, path.name + "-wal", path.name + "-journal"}
        self._deadline = math.inf  # monotonic: the statement running now is aborted after this
        self._limit = sql_timeout  # how long a statement may run: sql_timeout, or HURRY once stopping
        self._gone: set[str] = set()  # claimers known dead (a pid that is gone stays gone)
        self._backlog, self._tidy_at = False, 0.0  # the last claim left due messages behind; when to tidy
        self._repaired = Throttle(self.log, "queue_state_repaired",
                                  note="mailrelayd's own record was not as it wrote it: the message starts afresh")
        self._refused = Throttle(self.log, "message_refused")

    # -- opening -----------------------------------------------------------------

    def open(self, read_only: bool = False) -> None:
        """Open the file (never create it), check it, set WAL and create what is missing;
        `read_only`: only look, as reader.py says (create and write nothing at all).

        The file must be a regular file with one link, the very file SQLite opened, with
        nothing in it but Fossil's, the Tcl script's and our own tables (guard.py); else
        QueueError, and nothing is written to it. Switching a file to WAL does not wait for
        a writer the way other statements do (SQLite answers "database is locked" at once),
        so the set-up is retried on the same connection every 10 ms, for up to BUSY_TIMEOUT,
        while another process, such as Fossil mid-insert, holds the lock. Between tries no
        lock is held, so Fossil's own commit, which retries every 10 ms, never waits on this one.
        """
        if self._conn is not None:
            return
        expected = guard.check_file(self.path)
        resolved = os.path.realpath(self.path)
        deadline = time.monotonic() + BUSY_TIMEOUT
        conn = None
        try:
            conn = reader.connect(self.path, BUSY_TIMEOUT) if read_only else sqlite3.connect(
                self.path.absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)
            guard.check_opened(conn, self.path, expected, resolved)
            guard.harden(conn, self.max_size + PEEK, self._over)
            with self._deadline_for(conn):
                guard.check_schema(conn, self.path)
                if read_only:
                    reader.stand_in(conn)
            while not read_only:
                try:
                    with self._deadline_for(conn):
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
            raise QueueError(f"{self.path}: {reader.why(self.path, e) if read_only else self._why(e)}") from None
        self._conn = conn
        self._inode = (expected.st_dev, expected.st_ino)
        self._schema_version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if not read_only:
            with self._errors():
                self._forget_stale(everywhere=True)

    def _set_up(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode").fetchall()[0][0]
        self.journal_mode = mode if mode == "wal" else conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
        conn.execute("PRAGMA synchronous=NORMAL")
        sql.create_schema(conn, self.path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def interrupt(self) -> None:
        """A stop was asked for: the statement running now, and any later one, may run only
        HURRY seconds more (safe from another thread)."""
        self._limit = HURRY
        self._deadline = min(self._deadline, time.monotonic() + HURRY)

    def notice(self, kind: str, path: str) -> bool:
        return Path(path).name in self._watched

    # -- claim and acknowledge ----------------------------------------------------

    def claim(self, now: float, limit: int) -> list[QueuedMessage]:
        if guard.inode(self.path) != self._inode:  # the file was replaced: follow the path
            self.close()
            self.open()
        self._repaired.flush()
        self._refused.flush()
        with self._errors():
            self._recheck_schema()
            if not self._backlog or time.monotonic() >= self._tidy_at:  # while claims come full: now and then
                self._forget_stale()
                self._take_back_from_gone()
                self._tidy_at = time.monotonic() + TIDY_EVERY
            for _ in range(10):  # another relay may take our candidates first: look again
                ids = [row[0] for row in self._db.execute(sql.CANDIDATES, {"now": now, "limit": limit + 1}).fetchall()]
                self._backlog, ids = len(ids) > limit, ids[:limit]  # more are due than this claim takes
                if not ids:
                    return []
                claim = {"now": now, "owner": self.owner, "lease": now + self.lease, "ids": json.dumps(ids)}
                self._db.execute(sql.CLAIM, claim)
                rows = self._db.execute(sql.CLAIMED, claim).fetchall()
                claimed = [msg for row in rows if (msg := self._message(now, *row)) is not None]
                if claimed or rows:
                    return claimed
        return []

    def add(self, data: bytes, now: float) -> str:
        """One new row in `email`, stored as Fossil stores it (the bytes bound as text)."""
        with self._errors():
            return str(self._db.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (data,)).lastrowid)

    def stats(self, now: float) -> QueueStats:
        """The counts, from read-only statements. A row the relay has not seen yet is as old
        as its Date: (read from the header of the oldest such row only), else the file's mtime."""
        with self._errors():
            total, deferred, next_try, oldest, failed, sent, unseen, refused = self._db.execute(
                sql.STATS, {"now": now, "since": now - 86400}).fetchone()
            if unseen is not None:
                since = date_header(self._body(unseen, peek=16384)[0][:16384], now)
                if since is None:
                    try:
                        since = self.path.stat().st_mtime
                    except OSError:
                        since = now
                oldest = since if oldest is None else min(oldest, since)
        deferred, refused = deferred or 0, refused or 0
        return QueueStats(queued=max(0, total - deferred - refused), deferred=deferred, failed=failed, sent_24h=sent,
                          oldest_queued_s=None if oldest is None else max(0.0, now - oldest), next_try=next_try,
                          refused=refused)

    def _message(self, now: float, emailid: int, attempts, first_seen, digest, recipients) -> QueuedMessage | None:
        """The claimed row as a message, its record checked; None if it was refused unread."""
        data, size = self._body(emailid)
        if size > self.max_size:
            reason = f"{size} bytes, over max_size ({self.max_size}); refused unread, kept in email"
            self._db.execute(sql.REFUSE, {"refused": sql.REFUSED, "now": now, "reason": reason, "emailid": emailid})
            self.refused += 1
            self._refused(emailid=emailid, reason=reason)
            return None
        past, problem = stored.history(attempts, first_seen, recipients, now)
        if problem is not None:
            self._repaired(emailid=emailid, problem=problem)
        elif digest is not None and digest != stored.digest(data):
            past = stored.History(0, past.first_seen, None)  # the emailid was reused after ours left the queue
        envelope = ("", past.recipients) if past.recipients else None
        return QueuedMessage(id=emailid, data=data, attempts=past.attempts, first_seen=past.first_seen,
                             envelope=envelope, partial=envelope is not None)

    def _body(self, rowid: int, table: str = "email", peek: int = 0) -> tuple[bytes, int]:
        """A body in `table` (read through the blob API), and its size: all of it if it is no
        larger than max_size, else only its first `peek` bytes; b"" for NULL or a number."""
        try:
            blob = self._db.blobopen(table, "msg", rowid, readonly=True)
        except sqlite3.Error:
            return b"", 0
        with blob:
            size = len(blob)
            return blob.read(size if size <= self.max_size else peek), size

    def _peek(self, table: str, rowid: int) -> tuple[bytes, int]:
        """What an administrator may see of a body: up to max_size, else its first PEEK bytes
        (the header, for `show`)."""
        return self._body(rowid, table, peek=PEEK)

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
                (msg.attempts + 1, next_try, now, error, stored.digest(msg.data), stored.to_json(recipients), msg.id),
            )

    def set_aside(self, msg: QueuedMessage, reason: str, now: float,
                  recipients: tuple[str, ...] | None = None) -> None:
        with self._errors():
            self._db.execute("INSERT INTO mailrelayd_set_aside VALUES (?, ?, ?, ?, ?, ?)",
                             (msg.id, reason, msg.attempts + 1, msg.first_seen, now, stored.to_json(recipients)))

    def release(self, msgs: list[QueuedMessage]) -> None:
        with self._errors():
            self._db.execute(
                f"UPDATE mailrelayd_queue SET owner = NULL, lease_until = NULL"
                f" WHERE owner = ? AND emailid IN ({','.join('?' * len(msgs))})",
                (self.owner, *(m.id for m in msgs)),
            )

    def next_due(self, now: float) -> float | None:
        with self._errors():
            return self._db.execute(sql.NEXT_DUE).fetchall()[0][0]

    def settles_at(self, now: float) -> float | None:
        return None  # a row is complete once Fossil's transaction commits

    def maintain(self, now: float) -> None:
        """Prune old sentlog rows, refused rows past refused_retention, and state left
        behind by messages another program removed."""
        with self._errors():
            self._db.execute("DELETE FROM sentlog WHERE mtime < ?", (int(now - self.sentlog_retention),))
            self._db.execute(sql.PRUNE_REFUSED, {"before": now - self.refused_retention}).fetchall()
            self._db.execute(sql.FORGET_GONE)

    # -- administration (mailrelayd list, show, retry, purge) ------------------------

    def entries(self, states: Collection[str], now: float) -> list[Entry]:
        with self._errors():
            return admin.entries(self._db, self.path, states, now, self._peek)

    def find(self, ident: str, now: float) -> Entry | None:
        with self._errors():
            found = admin.entries(self._db, self.path, {"new", "deferred", "failed", "refused"}, now, self._peek,
                                  only=ident)
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
        with self._errors():
            done = [str(r[0]) for r in self._db.execute(sql.PRUNE_REFUSED, {"before": before}).fetchall()]
            self._db.execute(sql.FORGET_GONE)
        return sorted(done, key=int)

    def rescan(self) -> None:
        pass  # nothing is kept in memory

    def sent_times(self, since: float, limit: int) -> list[float]:
        with self._errors():
            rows = self._db.execute("SELECT mtime FROM sentlog WHERE mtime >= ? ORDER BY mtime DESC LIMIT ?",
                                    (int(since), limit)).fetchall()
        return [float(t) for (t,) in rows if isinstance(t, int | float)]

    # -- helpers ----------------------------------------------------------------

    def _recheck_schema(self) -> None:
        """The schema again, if anyone changed it since we looked (a trigger added later)."""
        version = self._db.execute("PRAGMA schema_version").fetchone()[0]
        if version != self._schema_version:
            guard.check_schema(self._db, self.path)
            self._schema_version = version

    def _forget_stale(self, everywhere: bool = False) -> None:
        """Drop our record of messages that are no longer there: another program removed
        them (at once, not at the next hourly maintenance), or their id now names a new
        message (Fossil reuses ids), whose record would hold it up. Ids are reused only at
        the top of the range: the records there are checked at each claim, all at open."""
        if self._db.execute(sql.ANY_GONE).fetchone()[0]:
            self._db.execute(sql.FORGET_GONE)
        top = None if everywhere else sql.TOP
        for emailid, digest in self._db.execute(sql.DEFERRED_RECORDS, {"top": top}).fetchall():
            data, size = self._body(emailid)
            if size <= self.max_size and stored.digest(data) != digest:
                self._db.execute("DELETE FROM mailrelayd_queue WHERE emailid = ? AND owner IS NULL", (emailid,))

    def _take_back_from_gone(self) -> None:
        """Free the claims of processes on this host that are gone (and of claimers that are
        not a claimer's name at all), among the oldest messages: the same cost with ten rows
        or ten million."""
        for (owner,) in self._db.execute(sql.CLAIMERS, {"owner": self.owner}).fetchall():
            if not isinstance(owner, str) or owner in self._gone or owner_is_gone(owner):
                self._db.execute("UPDATE mailrelayd_queue SET owner = NULL, lease_until = NULL WHERE owner = ?",
                                 (owner,))
                if isinstance(owner, str):
                    self._gone.add(owner)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueError(f"{self.path}: not open")
        return self._conn

    @contextmanager
    def _errors(self):
        """A deadline for the statements run inside (sql_timeout), and QueueError for any error."""
        try:
            with self._deadline_for(self._db):
                yield
        except sqlite3.Error as e:
            raise QueueError(f"{self.path}: {self._why(e)}") from None

    @contextmanager
    def _deadline_for(self, conn: sqlite3.Connection):
        self._deadline = time.monotonic() + self._limit
        try:
            yield
        finally:
            self._deadline = math.inf

    def _over(self) -> bool:
        """The progress handler's question: has the statement running now run too long?"""
        return time.monotonic() > self._deadline

    def _why(self, error: sqlite3.Error) -> str:
        if "interrupted" in str(error):
            return (f"a statement ran longer than sql_timeout ({self.sql_timeout:g} s) and was aborted; the file may"
                    " hold something that makes it slow")
        return str(error)

