"""The rules a spool entry must pass before a byte of it is read, and reading it.

The spool is written from inside a jail: an entry is only read if it is a regular file
with one link (not a hard link to a file elsewhere), opened without following links, no
larger than `max_size` and, with `owner_uid`, owned by that user. Files in the relay's own
state directory were checked (or written) by the relay itself: spool_owner does not
apply to them. Values read from state files are not trusted either (`number`).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Rules:
    max_size: int = 25 * 2**20
    owner_uid: int | None = None

    def refusal(self, st: os.stat_result, trusted: bool = False) -> str | None:
        """Why a file may not be read, or None. `trusted`: in the relay's state directory."""
        if not stat.S_ISREG(st.st_mode):
            return f"not a regular file ({kind(st.st_mode)})"
        if st.st_nlink != 1:
            return f"has {st.st_nlink} hard links: it may be a link to a file outside the spool"
        if st.st_size == 0:
            return "empty file"
        if st.st_size > self.max_size:
            return f"{st.st_size} bytes, over max_size ({self.max_size})"
        if self.owner_uid is not None and st.st_uid != self.owner_uid and not trusted:
            return f"owned by uid {st.st_uid}, not {self.owner_uid} (spool_owner)"
        return None


def read_all(fd: int, limit: int) -> bytes:
    """At most `limit` bytes of the file."""
    chunks, total = [], 0
    while total < limit and (chunk := os.read(fd, min(limit - total, 1 << 20))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def same_file(st: os.stat_result, name: str, dir_fd: int) -> bool:
    """Whether `name` in `dir_fd` is still the file `st` describes (not replaced or moved)."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def number(value, default: float | None = None):
    """A finite number read from a state file, or `default` for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return default
        return parsed if math.isfinite(parsed) else default
    return default


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown kind"
