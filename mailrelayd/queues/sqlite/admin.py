"""Administration of the SQLite queue: list, find, make due, put back and purge.

Reads go through sqlite-utils on the queue's own connection, with recursive triggers off
and no plugins run; every write is one statement, as the relay's own, so Fossil never
waits for the lock. A message set aside has left `email`, so it is named `F<n>` after its
row in `mailrelayd_failed` (the emailid it had may be reused by a new message).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

from mailrelayd.message import date_header
from mailrelayd.queues import Entry, stored
from mailrelayd.queues.sqlite import guard
from mailrelayd.queues.sqlite.schema import REFUSED, REQUEUE_VIEW

_WAITING = """
SELECT e.emailid AS id, q.attempts, q.first_seen, q.last_try, q.next_try, q.last_error, q.recipients
FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid
"""

_FAILED = """
SELECT id, emailid, reason, attempts, first_seen, failed_at, last_error, recipients FROM mailrelayd_failed
"""

Body = Callable[[str, int], tuple[bytes, int]]  # body(table, rowid): (bytes, whole size), as much as may be read


def entries(conn: sqlite3.Connection, path: Path, states: Collection[str], now: float, body: Body,
            only: str | None = None) -> list[Entry]:
    """The messages in `states` (new, deferred, failed, refused), oldest first; with `only`,
    just the one of that id. Every value read back is checked before it is shown; bodies
    are read through `body`, never past max_size."""
    db, found, states = guard.database(conn), [], set(states)
    failed_id = only is not None and only[:1] in "Ff"
    if states & {"new", "deferred", "refused"} and not failed_id:
        where, params = ("WHERE e.emailid = ?", [only]) if only else ("", [])
        file_mtime = None
        for row in db.query(f"{_WAITING} {where} ORDER BY e.emailid", params):
            next_try = stored.number(row["next_try"])
            state = ("refused" if next_try is not None and next_try >= REFUSED else
                     "deferred" if next_try is not None and next_try > now else "new")
            if state not in states:
                continue
            data, size = body("email", row["id"])
            first_seen = stored.number(row["first_seen"])
            if first_seen is None:  # not seen by a relay yet: since its Date:, else the file's last change
                if file_mtime is None:
                    file_mtime = path.stat().st_mtime
                first_seen = date_header(data, now) or file_mtime
            last_error = _text(row["last_error"])
            found.append(Entry(str(row["id"]), state, data, size, recipients=_recipients(row["recipients"]),
                               attempts=_count(row["attempts"]), first_seen=first_seen,
                               last_try=stored.number(row["last_try"]),
                               next_try=None if state == "refused" else next_try,
                               last_error=None if state == "refused" else last_error,
                               reason=last_error if state == "refused" else None,
                               failed_at=stored.number(row["last_try"]) if state == "refused" else None))
    if "failed" in states and (failed_id or not only):
        where, params = ("WHERE id = ?", [only[1:]]) if only is not None else ("", [])
        for row in db.query(f"{_FAILED} {where} ORDER BY id", params):
            data, size = body("mailrelayd_failed", row["id"])
            emailid, failed_at = row["emailid"], stored.number(row["failed_at"])
            found.append(Entry(f"F{row['id']}", "failed", data, size, recipients=_recipients(row["recipients"]),
                               attempts=_count(row["attempts"]), first_seen=stored.number(row["first_seen"]),
                               last_try=failed_at,  # the try that failed it
                               last_error=_text(row["last_error"]), reason=_text(row["reason"]) or "?",
                               failed_at=failed_at,
                               origin=str(emailid) if isinstance(emailid, int) else None))
    return found


def make_due(conn: sqlite3.Connection, ids: Sequence[str] | None, now: float) -> list[str]:
    """Deferred messages (these, or all) due now: one UPDATE."""
    where, params = f"next_try > ? AND next_try < {REFUSED} AND owner IS NULL", [now]
    if ids is not None:
        numbers = _numbers(ids)
        if not numbers:
            return []
        where += f" AND emailid IN ({','.join('?' * len(numbers))})"
        params += numbers
    rows = conn.execute(f"UPDATE mailrelayd_queue SET next_try = ? WHERE {where} RETURNING emailid",
                        [now, *params]).fetchall()
    return sorted((str(r[0]) for r in rows), key=int)


def requeue(conn: sqlite3.Connection, ids: Sequence[str] | None, now: float) -> list[tuple[str, str]]:
    """Failed messages back into `email`, each moved in one statement (a temporary view's
    trigger inserts it and deletes the failed row together): (F-id, new emailid) each."""
    conn.executescript(REQUEUE_VIEW)
    if ids is None:
        fids = [r[0] for r in conn.execute("SELECT id FROM mailrelayd_failed ORDER BY id").fetchall()]
    else:
        fids = _numbers(i[1:] for i in ids if i[:1] in "Ff")
    done = []
    for fid in fids:
        conn.execute("DELETE FROM temp.mailrelayd_requeued")
        conn.execute("INSERT INTO mailrelayd_requeue SELECT id, ? FROM mailrelayd_failed WHERE id = ?", (now, fid))
        for (emailid,) in conn.execute("SELECT emailid FROM temp.mailrelayd_requeued").fetchall():
            done.append((f"F{fid}", str(emailid)))
    return done


def purge_failed(conn: sqlite3.Connection, ids: Sequence[str] | None, before: float) -> list[str]:
    if ids is None:
        rows = conn.execute("DELETE FROM mailrelayd_failed WHERE coalesce(failed_at, 0) < ? RETURNING id",
                            (before,)).fetchall()
    else:
        fids = _numbers(i[1:] for i in ids if i[:1] in "Ff")
        rows = conn.execute(f"DELETE FROM mailrelayd_failed WHERE id IN ({','.join('?' * len(fids))}) RETURNING id",
                            fids).fetchall() if fids else []
    return [f"F{r[0]}" for r in sorted(rows)]


def purge_sent(conn: sqlite3.Connection, before: float) -> list[str]:
    rows = conn.execute("DELETE FROM sentlog WHERE mtime < ? RETURNING rowid", (int(before),)).fetchall()
    return [str(r[0]) for r in sorted(rows)]


def _numbers(ids: Iterable[str]) -> list[int]:
    return [int(i) for i in ids if i.isascii() and i.isdigit() and len(i) < 19]


def _recipients(value) -> tuple[str, ...] | None:
    try:
        return stored.address_list(value)
    except ValueError:
        return None


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _text(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None if value is None else str(value)
