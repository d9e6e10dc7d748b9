"""Fossil's SQLite queue (email-send-method=db): table `email(emailid, msg)`.

Works on the file exactly as Fossil and email-sender.tcl leave it, adding only tables of
its own: `mailrelayd_queue` (attempts, next try, last error and the claim of each
message it has seen), `mailrelayd_failed` (messages set aside, with the reason) and
`sentlog` (the Tcl script's log of sent mail, kept with the same meaning).

Fossil gives up on an insert after about a second of SQLITE_BUSY, so no write
transaction here does more than a few row updates: claims touch ids only, bodies are
read outside any write transaction (WAL lets Fossil write meanwhile), and each outcome
is recorded in a transaction of its own.
"""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from mailrelayd.message import Envelope
from mailrelayd.queues import QueuedMessage, QueueError, owner_is_gone, owner_token

_CANDIDATES = """
SELECT e.emailid FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid
WHERE q.emailid IS NULL OR (q.next_try <= :now AND (q.owner IS NULL OR q.lease_until <= :now))
ORDER BY e.emailid LIMIT :limit
"""

_CLAIM = """
INSERT INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, owner, lease_until)
SELECT emailid, 0, :now, :now, :owner, :lease FROM email WHERE emailid = :id
ON CONFLICT(emailid) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until
WHERE mailrelayd_queue.next_try <= :now
  AND (mailrelayd_queue.owner IS NULL OR mailrelayd_queue.lease_until <= :now)
"""

_NEXT_DUE = """
SELECT min(CASE WHEN q.owner IS NULL THEN q.next_try ELSE q.lease_until END)
FROM mailrelayd_queue q JOIN email e ON e.emailid = q.emailid
"""


class SqliteQueue:
    """The queue in one SQLite file. `lease` bounds how long a claim by a process on
    another host (which cannot be checked for life) keeps others off a message."""

    def __init__(self, path: Path, lease: float, sentlog_retention: float):
        self.path = path
        self.name = str(path)
        self.watch_dir = path.parent
        self.lease = lease
        self.sentlog_retention = sentlog_retention
        self.owner = owner_token()
        self._conn: sqlite3.Connection | None = None
        self._watched = {path.name, path.name + "-wal", path.name + "-journal"}

    # -- opening -----------------------------------------------------------------

    def open(self) -> None:
        """Open the file (never create it), set WAL and create what is missing."""
        if self._conn is not None:
            return
        if not self.path.exists():
            raise QueueError(f"{self.path}: no such file")
        try:
            conn = sqlite3.connect(
                self.path.absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None, timeout=5.0
            )
        except sqlite3.Error as e:
            raise QueueError(f"{self.path}: cannot open: {e}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=NORMAL")
            _create_schema(sqlite_utils.Database(conn), self.path)
        except sqlite3.DatabaseError as e:
            conn.close()
            if "not a database" in str(e):
                raise QueueError(f"{self.path}: not a SQLite database") from None
            raise QueueError(f"{self.path}: {e}") from None
        except QueueError:
            conn.close()
            raise
        self._conn = conn
        self._inode = self._path_inode()
        self.journal_mode = mode

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def wants_event(self, path: str) -> bool:
        return Path(path).name in self._watched

    # -- claim and acknowledge ----------------------------------------------------

    def claim(self, now: float, limit: int) -> list[QueuedMessage]:
        if self._path_inode() != self._inode:  # the file was replaced: follow the path
            self.close()
            self.open()
        with self._errors():
            self._take_back_from_gone(now)
            ids = [row[0] for row in self._db.execute(_CANDIDATES, {"now": now, "limit": limit})]
            if not ids:
                return []
            claimed = {}
            with self._write():
                for emailid in ids:
                    args = {"id": emailid, "now": now, "owner": self.owner, "lease": now + self.lease}
                    if self._db.execute(_CLAIM, args).rowcount:
                        claimed[emailid] = self._db.execute(
                            "SELECT attempts, first_seen, digest FROM mailrelayd_queue WHERE emailid = ?",
                            (emailid,),
                        ).fetchone()
            return [self._load(emailid, *state) for emailid, state in claimed.items()]

    def _load(self, emailid: int, attempts: int, first_seen: float, digest: bytes | None) -> QueuedMessage:
        row = self._db.execute("SELECT CAST(msg AS BLOB) FROM email WHERE emailid = ?", (emailid,)).fetchone()
        data = (row[0] if row else None) or b""
        if digest is not None and digest != _digest(data):
            attempts = 0  # the emailid was reused for a new message after ours left the queue
        return QueuedMessage(id=emailid, data=data, attempts=attempts, first_seen=first_seen)

    def mark_sent(self, msg: QueuedMessage, envelope: Envelope | None, now: float) -> None:
        with self._errors(), self._write():
            self._db.execute("DELETE FROM email WHERE emailid = ?", (msg.id,))
            self._db.execute("DELETE FROM mailrelayd_queue WHERE emailid = ?", (msg.id,))
            if envelope is not None:
                self._db.execute(
                    "INSERT INTO sentlog(mtime, xto, xfrom, xsubject, xsize) VALUES (?, ?, ?, ?, ?)",
                    (int(now), envelope.to_header, envelope.from_address, envelope.subject, envelope.size),
                )

    def defer(self, msg: QueuedMessage, error: str, next_try: float, now: float) -> None:
        with self._errors():
            self._db.execute(
                "UPDATE mailrelayd_queue SET attempts = ?, next_try = ?, last_try = ?, last_error = ?,"
                " digest = ?, owner = NULL, lease_until = NULL WHERE emailid = ?",
                (msg.attempts + 1, next_try, now, error, _digest(msg.data), msg.id),
            )

    def set_aside(self, msg: QueuedMessage, reason: str, now: float) -> None:
        with self._errors(), self._write():
            self._db.execute(
                "INSERT INTO mailrelayd_failed(emailid, msg, reason, attempts, first_seen, failed_at, last_error)"
                " SELECT e.emailid, CAST(e.msg AS BLOB), ?, ?, ?, ?, q.last_error"
                " FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid WHERE e.emailid = ?",
                (reason, msg.attempts + 1, msg.first_seen, now, msg.id),
            )
            self._db.execute("DELETE FROM email WHERE emailid = ?", (msg.id,))
            self._db.execute("DELETE FROM mailrelayd_queue WHERE emailid = ?", (msg.id,))

    def release(self, msgs: list[QueuedMessage]) -> None:
        with self._errors():
            self._db.executemany(
                "UPDATE mailrelayd_queue SET owner = NULL, lease_until = NULL WHERE emailid = ? AND owner = ?",
                [(m.id, self.owner) for m in msgs],
            )

    def next_due(self, now: float) -> float | None:
        with self._errors():
            return self._db.execute(_NEXT_DUE).fetchone()[0]

    def maintain(self, now: float) -> None:
        """Prune old sentlog rows and state left behind by messages another program removed."""
        with self._errors(), self._write():
            self._db.execute("DELETE FROM sentlog WHERE mtime < ?", (int(now - self.sentlog_retention),))
            self._db.execute(
                "DELETE FROM mailrelayd_queue WHERE owner IS NULL"
                " AND emailid NOT IN (SELECT emailid FROM email)"
            )

    # -- helpers ----------------------------------------------------------------

    def _path_inode(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _take_back_from_gone(self, now: float) -> None:
        owners = [
            owner
            for (owner,) in self._db.execute(
                "SELECT DISTINCT owner FROM mailrelayd_queue WHERE owner IS NOT NULL AND owner != ?", (self.owner,)
            )
            if owner_is_gone(owner)
        ]
        if owners:
            with self._write():
                self._db.executemany(
                    "UPDATE mailrelayd_queue SET owner = NULL, lease_until = NULL WHERE owner = ?",
                    [(o,) for o in owners],
                )

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueError(f"{self.path}: not open")
        return self._conn

    @contextmanager
    def _write(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.Error as e:
            raise QueueError(f"{self.path}: {e}") from None


def _create_schema(db: sqlite_utils.Database, path: Path) -> None:
    """Create Fossil's and the Tcl script's tables if missing, and ours; change nothing else."""
    if "email" in db.table_names():
        columns = db["email"].columns_dict
        if "emailid" not in columns or "msg" not in columns:
            raise QueueError(f"{path}: table email has no emailid and msg columns: not a Fossil email queue")
    db["email"].create({"emailid": int, "msg": str}, pk="emailid", if_not_exists=True)
    db["sentlog"].create({"mtime": int, "xto": str, "xfrom": str, "xsubject": str, "xsize": int}, if_not_exists=True)
    db["mailrelayd_queue"].create(
        {
            "emailid": int,
            "digest": bytes,
            "attempts": int,
            "first_seen": float,
            "next_try": float,
            "last_try": float,
            "last_error": str,
            "owner": str,
            "lease_until": float,
        },
        pk="emailid",
        not_null={"attempts", "first_seen", "next_try"},
        if_not_exists=True,
    )
    db["mailrelayd_queue"].create_index(["owner"], if_not_exists=True)
    db["mailrelayd_failed"].create(
        {
            "id": int,
            "emailid": int,
            "msg": bytes,
            "reason": str,
            "attempts": int,
            "first_seen": float,
            "failed_at": float,
            "last_error": str,
        },
        pk="id",
        if_not_exists=True,
    )


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
