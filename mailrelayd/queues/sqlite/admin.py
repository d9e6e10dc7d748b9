"""Administration of the SQLite queue: list, find, make due, put back and purge.

Reads go through sqlite-utils on the queue's own connection, with recursive triggers off
and no plugins run; every write is one statement, as the relay's own, so Fossil never
waits for the lock. A message set aside has left `email`, so it is named `F<n>` after its
row in `mailrelayd_failed` (the emailid it had may be reused by a new message).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from mailrelayd.message import date_header
from mailrelayd.queues import Entry
from mailrelayd.queues.sqlite.schema import REQUEUE_VIEW

_WAITING = """
SELECT e.emailid AS id, CAST(e.msg AS BLOB) AS data, q.attempts, q.first_seen, q.last_try, q.next_try,
       q.last_error, q.recipients
FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid
"""

_FAILED = """
SELECT id, emailid, CAST(msg AS BLOB) AS data, reason, attempts, first_seen, failed_at, last_error, recipients
FROM mailrelayd_failed
"""


def _database(conn: sqlite3.Connection):
    """sqlite-utils over `conn`, imported only when an administrator asks (it is slow to import)."""
    import sqlite_utils

    try:
        return sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)  # type: ignore[call-arg]
    except TypeError:  # a sqlite-utils without plugins (Debian 12's 3.30) has none to turn off
        return sqlite_utils.Database(conn, recursive_triggers=False)


def entries(conn: sqlite3.Connection, path: Path, states: Collection[str], now: float,
            only: str | None = None) -> list[Entry]:
    """The messages in `states`, oldest first; with `only`, just the one of that id."""
    db, found, states = _database(conn), [], set(states)
    if states & {"new", "deferred"} and not (only and only[:1] in "Ff"):
        where, params = ("WHERE e.emailid = ?", [only]) if only else ("", [])
        file_mtime = None
        for row in db.query(f"{_WAITING} {where} ORDER BY e.emailid", params):
            state = "deferred" if row["next_try"] is not None and row["next_try"] > now else "new"
            if state not in states:
                continue
            data = row["data"] or b""
            first_seen = row["first_seen"]
            if first_seen is None:  # not seen by a relay yet: since its Date:, else the file's last change
                if file_mtime is None:
                    file_mtime = path.stat().st_mtime
                first_seen = date_header(data, now) or file_mtime
            found.append(Entry(str(row["id"]), state, data, len(data), recipients=_recipients(row["recipients"]),
                               attempts=row["attempts"] or 0, first_seen=first_seen, last_try=row["last_try"],
                               next_try=row["next_try"], last_error=row["last_error"]))
    if "failed" in states and not (only and only[:1] not in "Ff"):
        where, params = ("WHERE id = ?", [only[1:]]) if only else ("", [])
        for row in db.query(f"{_FAILED} {where} ORDER BY id", params):
            data = row["data"] or b""
            found.append(Entry(f"F{row['id']}", "failed", data, len(data), recipients=_recipients(row["recipients"]),
                               attempts=row["attempts"] or 0, first_seen=row["first_seen"],
                               last_error=row["last_error"], reason=row["reason"], failed_at=row["failed_at"],
                               origin=None if row["emailid"] is None else str(row["emailid"])))
    return found


def make_due(conn: sqlite3.Connection, ids: Sequence[str] | None, now: float) -> list[str]:
    """Deferred messages (these, or all) due now: one UPDATE."""
    where, params = "next_try > ? AND owner IS NULL", [now]
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


def _recipients(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else None
