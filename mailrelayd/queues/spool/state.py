"""The directories of a spool queue, held open: the spool itself, and the state directory
beside it where the relay keeps what it took from the spool:

    STATE/deferred/NAME               a message waiting for its next try
    STATE/schedule/NAME               its attempts, first_seen, next_try, last_error (JSON)
    STATE/failed/NAME, NAME.reason    set aside by the relay, with the reason
    STATE/corrupt/NAME, NAME.reason   refused as unsafe or unreadable, with the reason
    STATE/sent/NAME                   sent, kept with keep_sent until sentlog_retention
    STATE/tmp/                        state files being written

Every operation goes through descriptors of these directories, opened once (the state's
without following links) and then used with openat, renameat and unlinkat: a link planted
in place of one of them is refused, never followed. A move is an atomic rename, followed
by an fsync of both directories; no name in failed/ or corrupt/ is ever reused (`NAME.1`,
...), and a name too long to take a suffix is shortened first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Collection
from pathlib import Path

from mailrelayd.inject import write_all
from mailrelayd.queues import QueueError
from mailrelayd.queues.spool.rules import READ_FLAGS, number, read_all

SUBDIRS = ("deferred", "schedule", "failed", "corrupt", "sent", "tmp")
SPOOL, ROOT = "spool", "root"  # the spool itself, and the state directory (besides SUBDIRS)
MAX_NAME = 200  # bytes: room left for ".reason" and ".N" within NAME_MAX (255)
RESCAN_DEFERRED = 60.0  # seconds: notice messages other relays (or an admin) deferred
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SpoolState:
    """The spool (`fd(SPOOL)`) and the directories under `root`, held open between `open`
    and `close`."""

    def __init__(self, spool: Path, root: Path):
        self.spool = spool
        self.root = root
        self._fds: dict[str, int] = {}
        self._absent: set[str] = set()  # opened read-only: state directories not there (read as empty)

    # -- opening -------------------------------------------------------------------------

    def open(self, read_only: bool = False) -> None:
        """Open the spool, then create what is missing of the state and open it, refusing
        links and another file system than the spool's (moves between them are renames).
        `read_only`: open what is there of the state, create nothing, and read what is
        missing as empty (the state may belong to another user: only the relay writes)."""
        if self._fds:
            return
        fds: dict[str, int] = {}
        try:
            fds[SPOOL] = spool_fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if read_only:
                self._absent = self._open_to_read(fds)
                self._fds = fds
                return
            parent = self.root.parent.stat()
            try:
                existing = os.lstat(self.root)
            except FileNotFoundError:
                existing = None
            device = existing.st_dev if existing is not None and stat.S_ISDIR(existing.st_mode) else parent.st_dev
            if device != os.fstat(spool_fd).st_dev:
                raise QueueError(f"{self.root} is not on the same file system as {self.spool}: moves would not"
                                 " be atomic; set state_dir to a directory beside the spool", permanent=True)
            _only_ours(self.root.parent, parent)
            if existing is None:
                os.mkdir(self.root, 0o750)
            fds[ROOT] = root_fd = _open_dir(str(self.root))
            _only_ours(self.root, os.fstat(root_fd))
            for sub in SUBDIRS:
                try:
                    os.mkdir(sub, 0o750, dir_fd=root_fd)
                except FileExistsError:
                    pass
                fds[sub] = _open_dir(sub, root_fd, f"{self.root}/{sub}")
                _only_ours(self.root / sub, os.fstat(fds[sub]))
        except BaseException as e:
            for fd in fds.values():
                os.close(fd)
            if isinstance(e, FileNotFoundError):
                raise QueueError(f"{e.filename}: no such directory") from None
            if isinstance(e, NotADirectoryError):
                raise QueueError(f"{e.filename}: not a directory") from None
            if isinstance(e, OSError):
                raise QueueError(f"{e.filename or self.root}: {e.strerror}") from None
            raise
        self._fds = fds

    def _open_to_read(self, fds: dict[str, int]) -> set[str]:
        """Open the state directories that are there into `fds`; the names of those that are not."""
        try:
            fds[ROOT] = _open_dir(str(self.root))
        except FileNotFoundError:
            return set(SUBDIRS)
        absent = set()
        for sub in SUBDIRS:
            try:
                fds[sub] = _open_dir(sub, fds[ROOT], f"{self.root}/{sub}")
            except FileNotFoundError:
                absent.add(sub)
        return absent

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds, self._absent = {}, set()

    def fd(self, sub: str) -> int:
        """The descriptor of SPOOL or of a state subdirectory."""
        if sub not in self._fds:
            raise QueueError(f"{self.spool}: not open")
        return self._fds[sub]

    # -- reading -------------------------------------------------------------------------

    def names(self, sub: str) -> list[str]:
        """The entries of `sub`, dot files left out, in name order."""
        if sub in self._absent:
            return []
        return sorted(n for n in os.listdir(self.fd(sub)) if not n.startswith("."))

    def lstat(self, sub: str, name: str) -> os.stat_result | None:
        if sub in self._absent:
            return None
        try:
            return os.stat(name, dir_fd=self.fd(sub), follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, sub: str, name: str) -> bool:
        return self.lstat(sub, name) is not None

    def read(self, sub: str, name: str, limit: int) -> bytes | None:
        """The bytes of a regular file here (at most `limit`), never through a link; None if
        there is no such file."""
        if sub in self._absent:
            return None
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=self.fd(sub))
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
            write_all(fd, data)
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


def _only_ours(path: Path, st: os.stat_result) -> None:
    """Refuse a state directory (or its parent) that anyone but the relay's user and root may
    write, as sshd's StrictModes does: whoever can write there can redirect the relay's moves."""
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise QueueError(f"{path} belongs to uid {st.st_uid}: a state directory and its parent must belong to the"
                         f" relay's user (uid {me}) or root; chown it, or set state_dir elsewhere on the spool's"
                         " file system", permanent=True)
    if st.st_mode & 0o022:
        raise QueueError(f"{path} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):o}): a"
                         f" state directory and its parent must be writable only by the relay's user and root;"
                         f" chmod go-w {path}, or set state_dir elsewhere on the spool's file system", permanent=True)


def _open_dir(name: str, dir_fd: int | None = None, shown: str | None = None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or a file where a directory belongs
            raise QueueError(f"{shown or name}: not a directory (a link or a file is in its place);"
                             " move it away") from None
        raise type(e)(e.errno, e.strerror, shown or name) from None  # named in full in the error line


def _one_line(text: str) -> str:
    return " ".join(text.split())


class DeferredIndex:
    """(next try, first seen) of each message in deferred/: kept up to date by this relay's
    own changes, and read again from disk every RESCAN_DEFERRED seconds (or after `stale()`)
    for the changes of other relays and of administrators."""

    def __init__(self, state: SpoolState):
        self.state = state
        self._times: dict[str, tuple[float, float]] | None = None
        self._scanned = float("-inf")

    def times(self, now: float) -> dict[str, tuple[float, float]]:
        if self._times is None or now - self._scanned >= RESCAN_DEFERRED:
            self._times = {}
            for name in self.state.names("deferred"):
                schedule = self.state.schedule(name)
                st = self.state.lstat("deferred", name)
                if st is not None:  # no schedule (a crash between move and write): due, as old as the file
                    self._times[name] = (number(schedule.get("next_try"), 0.0),
                                         number(schedule.get("first_seen"), st.st_mtime))
            self._scanned = now
        return self._times

    def due(self, now: float, held: Collection[str]) -> list[str]:
        """Names due by now, soonest first, but those `held`."""
        due = [(t, name) for name, (t, _) in self.times(now).items() if t <= now and name not in held]
        return [name for _, name in sorted(due)]

    def next_try(self, held: Collection[str]) -> float | None:
        """The soonest next try known (without reading the disk), but of those `held`."""
        return min((t for name, (t, _) in (self._times or {}).items() if name not in held), default=None)

    def set(self, name: str, next_try: float, first_seen: float | None = None) -> None:
        if self._times is not None:
            self._times[name] = (next_try, first_seen if first_seen is not None
                                 else self._times.get(name, (next_try, next_try))[1])

    def forget(self, name: str) -> None:
        if self._times is not None:
            self._times.pop(name, None)

    def stale(self) -> None:
        self._scanned = float("-inf")
