"""Opening Fossil's SQLite file only to look at it: `status`, `list` and `show`, which a
monitoring user may run who can read the file but write neither it nor its directory.

Nothing is created or written: no -wal, -shm or journal, no table, no lock file. To read a
file in WAL mode, SQLite needs its -shm (the index of the -wal) whenever a -wal exists:

- no -wal: no process has the file open (the last one to close it moved the WAL into the
  file and removed both), so the file is whole; it is read as `immutable`, which takes
  no lock and needs no -shm. A writer that opens it meanwhile writes to a new -wal, not
  to the file, until its first checkpoint (after about 1000 pages);
- a -wal and a -shm this user can read (a relay or Fossil has the file open): read with
  `mode=ro` through them, what is in the WAL included (SQLite keeps its own copy of the
  index in memory when the -shm is not writable);
- a -wal whose -shm is missing or unreadable: refused, with a line saying what is needed.

A file in rollback-journal mode (one no relay has opened yet) is read with `mode=ro`. The
tables of ours that the file lacks (no relay opened it yet), and columns added later,
are stood in for by empty TEMP tables and views, kept in memory.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from mailrelayd.queues import QueueError
from mailrelayd.queues.sqlite.guard import TABLES

WAL_NEEDS = ("reading it then needs read access to its -wal and -shm (SQLite makes them with the file's own"
             " mode: give this user read access to the file, as its group), or run as the relay's user")


def connect(path: Path, timeout: float) -> sqlite3.Connection:
    """A connection to `path` that can only read, made as the module says (QueueError if
    the file is in WAL mode with a -wal but no -shm)."""
    uri = path.absolute().as_uri()
    if not _in_wal_mode(path):
        uri += "?mode=ro"
    elif not _exists(path, "-wal"):
        uri += "?mode=ro&immutable=1"
    elif not _exists(path, "-shm"):
        raise QueueError(f"{path}: has a -wal but no -shm, which this user may not create; {WAL_NEEDS}")
    else:
        uri += "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout)
    conn.execute("PRAGMA temp_store = MEMORY")  # the stand-ins: no file in /tmp either
    return conn


def stand_in(conn: sqlite3.Connection) -> None:
    """Empty TEMP tables for the tables the file lacks, and TEMP views adding (as NULL) the
    columns it lacks, so that every read-only statement of the queue runs unchanged."""
    for name, (columns, _) in TABLES.items():
        present = {row[1] for row in conn.execute(f"PRAGMA main.table_info({name})")}
        if not present:
            conn.execute(f"CREATE TEMP TABLE {name}({', '.join(sorted(columns))})")
        elif columns - present:
            extra = ", ".join(f"NULL AS {column}" for column in sorted(columns - present))
            conn.execute(f"CREATE TEMP VIEW {name} AS SELECT *, {extra} FROM main.{name}")


def why(path: Path, error: sqlite3.Error) -> str:
    """The line for an error opening `path` to read."""
    if "unable to open" in str(error) and _in_wal_mode(path):
        return f"cannot open its -shm: a process has it open in WAL mode, and {WAL_NEEDS}"
    return str(error)


def _in_wal_mode(path: Path) -> bool:
    """True if the file's header says WAL (bytes 18 and 19: read and write versions 2)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # SQLite says why when it opens it
    try:
        return os.pread(fd, 2, 18) == b"\x02\x02"
    finally:
        os.close(fd)


def _exists(path: Path, suffix: str) -> bool:
    try:
        os.lstat(f"{path}{suffix}")
    except FileNotFoundError:
        return False
    return True
