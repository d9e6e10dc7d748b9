"""The SQLite file is untrusted: a jail owns `emailqueue.db`, mailrelayd's tables in it too.

Before anything is written to it, the file must be a regular file with one link (not a
symlink or hard link to another jail's `repo.fossil`), and the file SQLite opened must
be that very file (SQLite names it, links resolved, as the path resolved before; the
path is still the same device and inode after). A hard link to someone else's file
needs the rights Linux's protected_hardlinks (on by default) withholds. Its schema may
hold only Fossil's `email`, the Tcl script's `sentlog` and mailrelayd's own tables, with
their own columns and indexes: any trigger, view, virtual table or other object could
run code of the jail's choosing inside mailrelayd's statements, and refuses the queue
with a line naming it. Every connection runs with `trusted_schema=OFF`,
`cell_size_check=ON`, no memory mapping, a cap on the length of any value, and a progress
handler that aborts a statement running past its deadline.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

from mailrelayd.queues import QueueError

# What may be in the file: each table with its columns (mailrelayd_queue's and
# mailrelayd_failed's `recipients` came later: files from before lack it until opened).
TABLES = {
    "email": ({"emailid", "msg"}, set()),
    "sentlog": ({"mtime", "xto", "xfrom", "xsubject", "xsize"}, set()),
    "mailrelayd_queue": ({"emailid", "digest", "attempts", "first_seen", "next_try", "last_try", "last_error",
                          "owner", "lease_until", "recipients"}, {"recipients"}),
    "mailrelayd_failed": ({"id", "emailid", "msg", "reason", "attempts", "first_seen", "failed_at", "last_error",
                           "recipients"}, {"recipients"}),
}
INDEXES = {"mailrelayd_queue_owner": "mailrelayd_queue"}
PROGRESS_STEPS = 10_000  # virtual machine instructions between looks at the clock


def check_file(path: Path) -> os.stat_result:
    """The file's status, if it may be opened as a queue; else QueueError saying why."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise QueueError(f"{path}: no such file") from None
    except OSError as e:
        raise QueueError(f"{path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise QueueError(f"{path}: a symbolic link, refused (it could point at any file); give the real path")
    if not stat.S_ISREG(st.st_mode):
        raise QueueError(f"{path}: not a regular file")
    if st.st_nlink != 1:
        raise QueueError(f"{path}: has {st.st_nlink} hard links, refused (it could be another file, such as"
                         " another jail's repository)")
    return st


def inode(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path` now (links followed), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_opened(conn: sqlite3.Connection, path: Path, expected: os.stat_result, resolved: str) -> None:
    """QueueError unless SQLite opened the file that was checked: the file it names (with
    links resolved) is the path as resolved before, and the path still is the same file
    (device and inode). A link swapped in while SQLite opened the file shows as another
    name; a file swapped in to stay shows at the second look."""
    opened = next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "")
    try:
        st = check_file(path)
    except QueueError:
        st = None
    if opened != resolved or st is None or (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
        raise QueueError(f"{path}: the file changed while it was opened, refused (it was replaced, perhaps by a link)")


def harden(conn: sqlite3.Connection, max_length: int, over: Callable[[], bool]) -> None:
    """Settings for a connection to a file someone else controls; `over()` says when the
    statement running should be aborted (its deadline has passed, or a stop was asked)."""
    conn.execute("PRAGMA trusted_schema = OFF")
    conn.execute("PRAGMA cell_size_check = ON")
    conn.execute("PRAGMA mmap_size = 0")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_length)
    conn.set_progress_handler(lambda: 1 if over() else 0, PROGRESS_STEPS)


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """QueueError naming the first object in the file that is not Fossil's, the Tcl
    script's or mailrelayd's own, or not as they make it (read through sqlite-utils, on
    this connection). A table with no pages of its own (rootpage 0) is a virtual table,
    whatever its stored text says."""
    db = database(conn)
    for trigger in db.triggers:
        raise QueueError(f"{path}: has a trigger {trigger.name!r} (on {trigger.table}), refused: a Fossil email"
                         " queue has none")
    for view in db.view_names():
        raise QueueError(f"{path}: has a view {view!r}, refused: a Fossil email queue has none")
    pageless = {name for name, in conn.execute("SELECT name FROM main.sqlite_schema WHERE type = 'table'"
                                               " AND coalesce(rootpage, 0) = 0")}
    for name in db.table_names():
        if name not in TABLES:
            raise QueueError(f"{path}: has a table {name!r} that is not Fossil's or mailrelayd's, refused")
        table = db[name]
        if table.virtual_table_using or name in pageless:
            raise QueueError(f"{path}: table {name!r} is a virtual table ({table.virtual_table_using or 'no pages'}),"
                             " refused")
        wanted, optional = TABLES[name]
        columns = {row[1]: row[6] for row in conn.execute(f"PRAGMA table_xinfo({name})")}  # name: hidden
        if set(columns) - wanted or wanted - optional - set(columns) or any(columns.values()):
            raise QueueError(f"{path}: table {name!r} has columns {sorted(columns)}: not a Fossil email queue as"
                             " Fossil and mailrelayd make it, refused")
        for index in table.indexes:
            if INDEXES.get(index.name) != name and not index.name.startswith("sqlite_autoindex_"):
                raise QueueError(f"{path}: has an index {index.name!r} on {name!r} that is not mailrelayd's,"
                                 " refused")


def database(conn: sqlite3.Connection):
    """sqlite-utils over `conn`: recursive triggers off, no plugins run."""
    import sqlite_utils

    try:
        return sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)  # type: ignore[call-arg]
    except TypeError:  # a sqlite-utils without plugins (Debian 12's 3.30) has none to turn off
        return sqlite_utils.Database(conn, recursive_triggers=False)
