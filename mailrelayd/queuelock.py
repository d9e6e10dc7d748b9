"""One relay per queue: an exclusive flock on a file beside the queue, holding its pid.

The lock belongs to the open file description, so it survives fork (then call
`rewrite_pid`) and dies with the last process holding the descriptor: a crashed relay
leaves no stale lock, only a stale pid in a file nobody holds. The file is never deleted
(a delete races with another process locking the old file). Not for network file
systems whose flock is not shared between hosts.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class QueueLock:
    """The lock file at `path`, created 0644 if missing; a symlink there is refused."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, write_pid: bool = True) -> int | None:
        """Take the lock and write our pid (or, with `write_pid` false, empty the file: a
        process about to fork writes its child's later): None. If another process holds
        it: its pid (0 if unreadable, as while it is being written), and nothing is kept open.

        Raises OSError when the file cannot be opened (a symlink: ELOOP; no permission)."""
        if self._fd is not None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            return pid
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if write_pid:
            self.rewrite_pid()
        else:
            os.ftruncate(fd, 0)
        return None

    def rewrite_pid(self, note: str = "") -> None:
        """Write the current pid again (after a fork: the lock is still held), and a line
        `note` after it for `holder_note` (the daemon's concurrency)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: lock not held")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n{note}".encode(), 0)

    def fileno(self) -> int:
        """The held descriptor (to keep it open across a daemon's detaching)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: lock not held")
        return self._fd

    def release(self, clear: bool = False) -> None:
        """Unlock and close; the file stays (emptied first with `clear`, as a pidfile is)."""
        if self._fd is not None:
            if clear:
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder_pid(path: Path) -> int | None:
    """The pid of the process holding the lock at `path` (0 if it wrote none), or None if
    nobody holds it or there is no file. Probed with a shared lock: for that instant a
    relay starting would find the lock taken. A file this user may not read (a monitoring
    user's `status`): the holder /proc/locks names for it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        return _holder_in_proc_locks(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)  # also drops the shared lock when it was granted
    return None


def holder_note(path: Path) -> str | None:
    """The note the process holding the lock at `path` wrote after its pid, or None if
    nobody holds it."""
    if holder_pid(path) is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.pread(fd, 256, 0).decode("ascii", "replace").partition("\n")[2].strip()
    finally:
        os.close(fd)


def _holder_in_proc_locks(path: Path) -> int | None:
    """The pid of the process holding a flock on the file at `path`, as /proc/locks gives it
    (`1: FLOCK  ADVISORY  WRITE PID MAJOR:MINOR:INODE 0 EOF`, device numbers in hex), or None."""
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for fields in map(str.split, lines):
        if "FLOCK" in fields and file_id in fields and "->" not in fields:  # "->": a waiter, not the holder
            pid = fields[fields.index(file_id) - 1]
            return int(pid) if pid.isdigit() else 0
    return None


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").partition("\n")[0].strip()
    except (OSError, UnicodeDecodeError):
        return 0
    return int(text) if text.isdigit() else 0
