"""Which spool files are whole, from what the file events said of each one's writer.

Fossil writes each file in place with no lock. A file seen being written (created or
modified events) is whole only once its writer has closed it (a close-after-write event,
or the file renamed in whole), however long the writer pauses. `settle` applies only to
files no writing was seen of (found at start-up, or without events): whole once unchanged
that long. A file seen being written whose close never came (events lost) is taken only
once settled and a read lease proves its writer gone (`needs proof`).

A read lease (`read_lease`) is the kernel's proof that no process has a file open for
writing; it can be had as the file's owner, root or with CAP_LEASE, on local file systems.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
from collections.abc import Callable, Iterable

PRUNE_AT = 10_000  # forget names gone from the spool once this many are remembered


class Writers:
    def __init__(self, settle: float):
        self.settle = settle
        self._seen: dict[str, bool] = {}  # name -> closed by its writer (True) or being written (False)
        self._held_open: set[str] = set()  # names a lease showed held open by a writer (said once)
        self._prune_at = PRUNE_AT

    def saw(self, kind: str, name: str) -> bool:
        """Record a file event (on the watcher's thread: one dict store); True for a close."""
        if kind == "attrib":  # a chmod or chown: no writing
            return False
        closed = kind in ("closed", "moved")  # written and closed, or renamed in whole
        self._seen[name] = closed
        return closed

    def taken(self, name: str) -> None:
        self._seen.pop(name, None)
        self._held_open.discard(name)

    def held_open(self, name: str) -> bool:
        """A lease showed a writer holding `name` open; True the first time (to say so once)."""
        first = name not in self._held_open
        self._held_open.add(name)
        return first

    def whole(self, names: Iterable[str], stat_of: Callable[[str], os.stat_result | None],
              exists: Callable[[str], bool], now: float) -> tuple[list[tuple[str, bool]], float | None]:
        """(name, needs proof) of the whole files among `names`, and when the next file no
        writing was seen of settles (None: none waits)."""
        if len(self._seen) + len(self._held_open) > self._prune_at:  # names that others took or removed
            for name in list(self._seen) + list(self._held_open):
                if not exists(name):
                    self.taken(name)
            self._prune_at = max(PRUNE_AT, 2 * (len(self._seen) + len(self._held_open)))
        whole, settles_at = [], None
        for name in names:
            closed = self._seen.get(name)
            if closed:
                whole.append((name, False))
                continue
            st = stat_of(name)
            if st is None:
                continue
            if closed is False and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1):
                closed = None  # a link, FIFO or directory, never written in place: refused once settled
            settles = st.st_mtime + self.settle
            if settles <= now:
                whole.append((name, closed is False))
            elif closed is None and (settles_at is None or settles < settles_at):
                settles_at = settles
        return whole, settles_at


def read_lease(fd: int) -> bool | None:
    """Take a read lease on `fd` (opened read-only), which the kernel grants only when no
    process has the file open for writing. True: granted (no writer; a writer opening it
    now waits until release_lease); False: a writer holds it open; None: no proof to be
    had (not the file's owner, root or CAP_LEASE; NFS and other file systems without
    leases; fs.leases-enable = 0)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)  # a lease break then signals SIGURG, ignored
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)  # by default (SIGIO, the default, kills)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def release_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # closing the file releases it too
