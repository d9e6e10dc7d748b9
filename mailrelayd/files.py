"""Durable file-system steps shared by the spool queue and the Maildir transport."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new or removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Replace `path` with `data` atomically: write in `tmp_dir`, fsync, rename."""
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)


def free_name(directory: Path, name: str) -> Path:
    """`directory/name`, or `name.1`, `name.2`... if that or its `.reason` file is taken:
    never replace a message or the reason kept beside one."""
    candidate, n = directory / name, 0
    while os.path.lexists(candidate) or os.path.lexists(f"{candidate}.reason"):
        n += 1
        candidate = directory / f"{name}.{n}"
    return candidate
