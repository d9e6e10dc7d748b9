"""The state directory beside a spool, where the relay keeps what it took from it:

    STATE/deferred/NAME               a message waiting for its next try
    STATE/schedule/NAME               its attempts, first_seen, next_try, last_error (JSON)
    STATE/failed/NAME, NAME.reason    set aside by the relay, with the reason
    STATE/corrupt/NAME, NAME.reason   refused as unsafe or unreadable, with the reason
    STATE/sent/NAME                   sent, kept with keep_sent until sentlog_retention
    STATE/tmp/                        state files being written

Every operation goes through descriptors of these directories, opened once without
following links (openat, renameat, unlinkat relative to them): a link planted in place of
one of them is refused, never followed. A move is an atomic rename, followed by an fsync
of both directories; no name in failed/ or corrupt/ is ever reused (`NAME.1`, ...), and a
name too long to take a suffix is shortened first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

from mailrelayd.queues import QueueError

SUBDIRS = ("deferred", "schedule", "failed", "corrupt", "sent", "tmp")
MAX_NAME = 200  # bytes: room left for ".reason" and ".N" within NAME_MAX (255)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SpoolState:
    """The directories under `root`, held open between `open` and `close`."""

    def __init__(self, root: Path):
        self.root = root
        self._root_fd: int | None = None
        self._fds: dict[str, int] = {}

    # -- opening -------------------------------------------------------------------------

    def open(self, spool_dev: int) -> None:
        """Create what is missing and open every directory, refusing links and another file
        system than the spool's (`spool_dev`: moves between them must be renames)."""
        if self._root_fd is not None:
            return
        try:
            parent = self.root.parent.stat()
        except FileNotFoundError:
            raise QueueError(f"{self.root.parent}: no such directory") from None
        except OSError as e:
            raise QueueError(f"{self.root.parent}: {e.strerror}") from None
        try:
            fds = []
            try:
                existing = os.lstat(self.root)
            except FileNotFoundError:
                existing = None
            device = existing.st_dev if existing is not None and stat.S_ISDIR(existing.st_mode) else parent.st_dev
            if device != spool_dev:
                raise QueueError(f"{self.root} is not on the same file system as the spool: moves would not be"
                                 " atomic; set state_dir to a directory beside the spool", permanent=True)
            if existing is None:
                os.mkdir(self.root, 0o750)
            root_fd = _open_dir(str(self.root))
            fds.append(root_fd)
            for sub in SUBDIRS:
                try:
                    os.mkdir(sub, 0o750, dir_fd=root_fd)
                except FileExistsError:
                    pass
                fds.append(_open_dir(sub, root_fd, f"{self.root}/{sub}"))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise QueueError(f"{e.filename or self.root}: {e.strerror}") from None
        except QueueError:
            for fd in fds:
                os.close(fd)
            raise
        self._root_fd = fds[0]
        self._fds = dict(zip(SUBDIRS, fds[1:]))

    def close(self) -> None:
        for fd in [self._root_fd, *self._fds.values()]:
            if fd is not None:
                os.close(fd)
        self._root_fd, self._fds = None, {}

    def fd(self, sub: str) -> int:
        if sub not in self._fds:
            raise QueueError(f"{self.root}: not open")
        return self._fds[sub]

    # -- reading -------------------------------------------------------------------------

    def names(self, sub: str) -> list[str]:
        """The entries of `sub`, dot files left out, in name order."""
        return sorted(n for n in os.listdir(self.fd(sub)) if not n.startswith("."))

    def lstat(self, sub: str, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd(sub), follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, sub: str, name: str) -> bool:
        return self.lstat(sub, name) is not None

    def read(self, sub: str, name: str, limit: int) -> bytes | None:
        """The bytes of a regular file here (at most `limit`), never through a link; None if
        there is no such file."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd(sub))
        except (FileNotFoundError, OSError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return read_all(fd, limit)
        finally:
            os.close(fd)

    def schedule(self, name: str) -> dict:
        """The schedule of deferred/NAME: {} if it has none (a crash between move and write)
        or it is not a JSON object."""
        data = self.read("schedule", name, 1 << 16)
        try:
            state = json.loads(data) if data else {}
        except ValueError:
            return {}
        return state if isinstance(state, dict) else {}

    def reason(self, sub: str, name: str) -> dict[str, str]:
        """The `key: value` lines of NAME.reason in failed/ or corrupt/."""
        data = self.read(sub, f"{name}.reason", 1 << 16) or b""
        lines = data.decode("utf-8", "replace").splitlines()
        return dict(line.split(": ", 1) for line in lines if ": " in line)

    # -- writing -------------------------------------------------------------------------

    def write(self, sub: str, name: str, data: bytes) -> None:
        """Replace `sub`/NAME with `data` atomically: write in tmp/, fsync, rename, fsync."""
        tmp = f"{name[:MAX_NAME]}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640,
                     dir_fd=self.fd("tmp"))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self.fd("tmp"), dst_dir_fd=self.fd(sub))
        os.fsync(self.fd(sub))

    def write_schedule(self, name: str, state: dict) -> None:
        self.write("schedule", name, json.dumps(state).encode())

    def unlink(self, sub: str, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd(sub))
        except FileNotFoundError:
            pass

    def free_name(self, sub: str, name: str) -> str:
        """`name`, or `name.1`, `name.2`... if that or its `.reason` is taken in `sub`; a
        name too long for a suffix is shortened first (keeping a digest of the rest)."""
        if len(os.fsencode(name)) > MAX_NAME:
            digest = hashlib.blake2b(os.fsencode(name), digest_size=6).hexdigest()
            name = os.fsdecode(os.fsencode(name)[: MAX_NAME - 13]) + "~" + digest
        candidate, n = name, 0
        while self.exists(sub, candidate) or self.exists(sub, f"{candidate}.reason"):
            n += 1
            candidate = f"{name}.{n}"
        return candidate

    def move_in(self, src_fd: int, src_name: str, sub: str, name: str | None = None) -> str | None:
        """Rename `src_name` (in directory `src_fd`) into `sub` under a free name; fsync both
        directories. The name it got, or None if the source was gone (taken by another)."""
        target = self.free_name(sub, name or src_name)
        try:
            os.rename(src_name, target, src_dir_fd=src_fd, dst_dir_fd=self.fd(sub))
        except FileNotFoundError:
            return None
        os.fsync(self.fd(sub))
        os.fsync(src_fd)
        return target

    def set_aside(self, src_fd: int, src_name: str, sub: str, reason: str, **details) -> str | None:
        """Move an entry into failed/ or corrupt/ with NAME.reason beside it (the reason and
        `details`, one `key: value` a line); the name it got, or None if it was gone."""
        target = self.move_in(src_fd, src_name, sub)
        if target is not None:
            lines = [f"reason: {_one_line(reason)}", *(f"{key}: {_one_line(str(v))}" for key, v in details.items())]
            self.write(sub, f"{target}.reason", ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
        return target

    def prune(self, sub: str, before: float, names: list[str] | None = None) -> list[str]:
        """Delete entries of `sub` (these, or all) put there before `before`, each with its
        .reason (whose time is when it was put there); the names deleted."""
        done, aside = [], sub in ("failed", "corrupt")
        for name in names if names is not None else self.names(sub):
            if aside and name.endswith(".reason"):
                continue
            st = (self.lstat(sub, f"{name}.reason") if aside else None) or self.lstat(sub, name)
            if st is not None and st.st_mtime < before:
                self.unlink(sub, name)
                self.unlink(sub, f"{name}.reason")
                done.append(name)
        return done


def read_all(fd: int, limit: int) -> bytes:
    """At most `limit` bytes of the file."""
    chunks, total = [], 0
    while total < limit and (chunk := os.read(fd, min(limit - total, 1 << 20))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _open_dir(name: str, dir_fd: int | None = None, shown: str | None = None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or a file where a directory belongs
            raise QueueError(f"{shown or name}: not a directory (a link or a file is in its place);"
                             " move it away") from None
        raise


def _one_line(text: str) -> str:
    return " ".join(text.split())
