"""Fossil's spool directory (email-send-method=dir): one file per message.

The spool is written from inside a jail, so its content is hostile: an entry is only
read if it is a regular file with one link, opened without following links, no larger
than `max_size` and (optionally) owned by `owner_uid`; anything else is moved aside to
corrupt/ with the reason, unread. Fossil writes each file in place with no lock, so a
file is only taken once its writer closed it (an inotify close-after-write event) or
it has been unchanged for `settle` seconds.

Each claimed file is held with an exclusive flock for the whole delivery, so several
relays can share a spool; the lock dies with its process. The state lives beside the
spool, never in it (Fossil's /stat page counts every entry in the spool as waiting), on
the same file system so that every move is an atomic rename:

    SPOOL/NAME                        new messages (Fossil's, or mailrelayd-sendmail's)
    STATE/deferred/NAME               a message waiting for its next try
    STATE/schedule/NAME               its attempts, first_seen, next_try, last_error (JSON)
    STATE/failed/NAME, NAME.reason    set aside by the relay, with the reason
    STATE/corrupt/NAME, NAME.reason   refused as unsafe or unreadable, with the reason
    STATE/sent/NAME                   sent, kept with keep_sent until sentlog_retention
    STATE/tmp/                        state files being written

Messages of the relay's own (`add`) are written straight into STATE/deferred, due at once:
they are trusted, so neither settle nor spool_owner applies to them.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import stat
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mailrelayd.files import free_name, fsync_dir, write_durably
from mailrelayd.inject import spool_file_name, split_envelope
from mailrelayd.log import get_logger
from mailrelayd.message import Envelope
from mailrelayd.queues import QueuedMessage, QueueError, QueueStats

STATE_DIRS = ("deferred", "schedule", "failed", "corrupt", "sent", "tmp")
RESCAN_DEFERRED = 60.0  # seconds: notice messages other relays (or an admin) deferred
LIST_BATCH = 4096  # oldest names taken from one listing: memory stays flat however long the backlog
OLDEST_PROBE = 64  # new files whose age stats() looks at: those with the smallest names


@dataclass
class _Held:
    fd: int
    path: Path


class SpoolQueue:
    def __init__(self, spool: Path, state: Path | None = None, *, settle: float = 2.0,
                 max_size: int = 25 * 2**20, owner_uid: int | None = None, keep_sent: bool = False,
                 sentlog_retention: float = 30 * 86400):
        self.spool = spool = spool.absolute()
        self.state = (state or spool.with_name(spool.name + ".mailrelayd")).absolute()
        self.name = str(spool)
        self.lock_path = spool.with_name(spool.name + ".mailrelayd.lock")
        self.watch_dir = spool
        self.settle = settle
        self.max_size = max_size
        self.owner_uid = owner_uid
        self.keep_sent = keep_sent
        self.sentlog_retention = sentlog_retention
        self._closed: set[str] = set()  # names whose writer has closed them (watcher's thread)
        self._held: dict[str, _Held] = {}
        self._deferred: dict[str, tuple[float, float]] | None = None  # name -> (next try, first seen)
        self._deferred_scanned = float("-inf")
        self._ready: deque[str] = deque()  # complete new files from the last listing, oldest first
        self._settles_at: float | None = None  # when the next unsettled new file may be taken
        self.log = get_logger(queue=self.name)
        self._dirs = {sub: self.state / sub for sub in STATE_DIRS}

    def dir(self, name: str) -> Path:
        return self._dirs[name]

    # -- opening -----------------------------------------------------------------

    def open(self) -> None:
        """Check the spool, refuse two file systems, create the state directories."""
        try:
            spool_dev = self.spool.stat().st_dev
            if not self.spool.is_dir():
                raise QueueError(f"{self.spool}: not a directory")
            state_dev = (self.state if self.state.exists() else self.state.parent).stat().st_dev
            if spool_dev != state_dev:
                raise QueueError(f"{self.state} is not on the same file system as {self.spool}: moves would"
                                 " not be atomic; set state_dir to a directory beside the spool", permanent=True)
            self.state.mkdir(mode=0o750, exist_ok=True)
            for sub in STATE_DIRS:
                self.dir(sub).mkdir(mode=0o750, exist_ok=True)
        except FileNotFoundError as e:
            raise QueueError(f"{e.filename}: no such directory") from None
        except OSError as e:
            raise QueueError(f"{e.filename}: {e.strerror}") from None

    def close(self) -> None:
        for held in self._held.values():
            os.close(held.fd)
        self._held.clear()

    def notice(self, kind: str, path: str) -> bool:
        directory, _, name = path.rpartition("/")
        if directory != str(self.spool) or name.startswith("."):
            return False
        if kind in ("closed", "moved"):  # written and closed, or renamed in whole
            self._closed.add(name)
        return True

    # -- claim and acknowledge ----------------------------------------------------

    def claim(self, now: float, limit: int) -> list[QueuedMessage]:
        claimed: list[QueuedMessage] = []
        try:
            for name in self._due_deferred(now):
                if len(claimed) >= limit:
                    break
                path = self.dir("deferred") / name
                if msg := self._take(path, now):
                    claimed.append(msg)
                elif not os.path.lexists(path):  # sent or set aside by another relay
                    self._deferred.pop(name, None)
            listed = False
            while len(claimed) < limit:
                if not self._ready:  # the directory is listed only once the last listing is used up
                    if listed:
                        break
                    self._ready.extend(self._list_ready(now))
                    listed = True
                elif msg := self._take(self.spool / self._ready.popleft(), now):
                    claimed.append(msg)
        except OSError as e:
            self.release(claimed)
            raise QueueError(f"{self.spool}: {e.strerror or e}") from None
        return claimed

    def add(self, data: bytes, now: float) -> str:
        """Write a message of the relay's own into deferred/, with a schedule due now (first
        the message, so that a crash leaves at worst a message with no history, due now)."""
        try:
            path = free_name(self.dir("deferred"), spool_file_name())
            write_durably(path, data, self.dir("tmp"))
            state = {"attempts": 0, "first_seen": now, "next_try": now, "last_try": None, "last_error": None}
            write_durably(self._schedule(path), json.dumps(state).encode(), self.dir("tmp"))
        except OSError as e:
            raise QueueError(f"{self.state}: {e.strerror or e}") from None
        if self._deferred is not None:
            self._deferred[path.name] = (now, now)
        return path.name

    def stats(self, now: float) -> QueueStats:
        """The counts from directory listings and the deferred index (which may be up to
        RESCAN_DEFERRED seconds behind other processes' changes). A new file's age is its
        mtime; only the OLDEST_PROBE smallest names are looked at (Fossil's and
        mailrelayd-sendmail's names start with the time they were written). With keep_sent,
        sent_24h stats every kept file."""
        try:
            with os.scandir(self.spool) as entries:
                new = [e.name for e in entries if not e.name.startswith(".")]
            times = []
            for name in heapq.nsmallest(OLDEST_PROBE, new):
                try:
                    times.append(os.lstat(self.spool / name).st_mtime)
                except FileNotFoundError:
                    pass
            deferred = self._deferred_index(now).values()
            later = [t for t, _ in deferred if t > now]
            times += [first_seen for _, first_seen in deferred]
            names = set(os.listdir(self.dir("failed")))
            failed = sum(1 for n in names if not (n.endswith(".reason") and n[:-7] in names))
            sent = None
            if self.keep_sent:
                with os.scandir(self.dir("sent")) as entries:
                    sent = sum(1 for e in entries if e.stat(follow_symlinks=False).st_mtime >= now - 86400)
        except OSError as e:
            raise QueueError(f"{self.state}: {e.strerror or e}") from None
        oldest = min(times, default=None)
        return QueueStats(queued=len(new) + len(deferred) - len(later), deferred=len(later), failed=failed,
                          sent_24h=sent, oldest_queued_s=None if oldest is None else max(0.0, now - oldest),
                          next_try=min(later, default=None))

    def mark_sent(self, sent: list[tuple[QueuedMessage, Envelope | None]], now: float) -> None:
        for msg, _ in sent:
            self._mark_one_sent(msg, now)

    def _mark_one_sent(self, msg: QueuedMessage, now: float) -> None:
        held = self._held.pop(str(msg.id))
        with self._finishing(held):
            if self.keep_sent:
                kept = free_name(self.dir("sent"), held.path.name)
                os.rename(held.path, kept)
                os.utime(kept, (now, now))  # kept for sentlog_retention from now, not from its writing
                fsync_dir(self.dir("sent"))
                fsync_dir(held.path.parent)
            else:  # an unlink lost in a power cut can only mean a message sent twice
                os.unlink(held.path)
            self._forget_deferred(held.path)

    def defer(self, msg: QueuedMessage, error: str, next_try: float, now: float,
              recipients: tuple[str, ...] | None = None) -> None:
        held = self._held.pop(str(msg.id))
        with self._finishing(held):
            path = held.path
            if path.parent != self.dir("deferred"):
                path = free_name(self.dir("deferred"), path.name)
                os.rename(held.path, path)
                fsync_dir(held.path.parent)
            state = {"attempts": msg.attempts + 1, "first_seen": msg.first_seen, "next_try": next_try,
                     "last_try": now, "last_error": error}
            remaining = recipients if recipients is not None else self._read_state(path).get("recipients")
            if remaining:  # after a partial send, only these are still to get it
                state["recipients"] = list(remaining)
            write_durably(self._schedule(path), json.dumps(state).encode(), self.dir("tmp"))
            if self._deferred is not None:
                self._deferred[path.name] = (next_try, msg.first_seen)

    def set_aside(self, msg: QueuedMessage, reason: str, now: float,
                  recipients: tuple[str, ...] | None = None) -> None:
        held = self._held.pop(str(msg.id))
        extra = {"recipients": ", ".join(recipients)} if recipients is not None else {}
        with self._finishing(held):
            self._move_aside(held.path, "failed", reason, attempts=msg.attempts + 1,
                             first_seen=msg.first_seen, failed_at=now, **extra)
            self._forget_deferred(held.path)

    def release(self, msgs: list[QueuedMessage]) -> None:
        for msg in msgs:
            held = self._held.pop(str(msg.id), None)
            if held is not None:
                os.close(held.fd)

    def next_due(self, now: float) -> float | None:
        times = [t for name, (t, _) in (self._deferred or {}).items() if name not in self._held]
        if self._settles_at is not None:
            times.append(self._settles_at)
        return min(times, default=None)

    def settles_at(self, now: float) -> float | None:
        return self._settles_at

    def maintain(self, now: float) -> None:
        """Prune kept sent files past the retention, orphan state files and stale temporaries."""
        try:
            for entry in os.scandir(self.dir("sent")):
                if entry.stat(follow_symlinks=False).st_mtime < now - self.sentlog_retention:
                    os.unlink(entry.path)
            for entry in os.scandir(self.dir("schedule")):
                if not os.path.lexists(self.dir("deferred") / entry.name):
                    os.unlink(entry.path)
            for entry in os.scandir(self.dir("tmp")):
                if entry.stat(follow_symlinks=False).st_mtime < now - 3600:
                    os.unlink(entry.path)
        except OSError as e:
            raise QueueError(f"{self.state}: {e.strerror or e}") from None

    # -- finding work -------------------------------------------------------------

    def _deferred_index(self, now: float) -> dict[str, tuple[float, float]]:
        """(next try, first seen) of each deferred name, kept up to date by our own changes
        and read again from disk every RESCAN_DEFERRED seconds (for other relays' changes)."""
        if self._deferred is None or now - self._deferred_scanned >= RESCAN_DEFERRED:
            self._deferred = {}
            for entry in os.scandir(self.dir("deferred")):
                state = self._read_state(Path(entry.path))
                try:  # no schedule (a crash between move and write): since the file was written
                    first_seen = state.get("first_seen") or entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                self._deferred[entry.name] = (state.get("next_try", 0.0), first_seen)
            self._deferred_scanned = now
        return self._deferred

    def _due_deferred(self, now: float) -> list[str]:
        """Deferred names due by now, soonest first."""
        due = [(t, name) for name, (t, _) in self._deferred_index(now).items() if t <= now and name not in self._held]
        return [name for _, name in sorted(due)]

    def _list_ready(self, now: float) -> list[str]:
        """Names in the spool that are complete: closed by their writer, or settled."""
        ready, self._settles_at = [], None
        with os.scandir(self.spool) as entries:
            names = heapq.nsmallest(LIST_BATCH, (e.name for e in entries if not e.name.startswith(".")))
        if len(self._closed) > 10_000:  # names that others took: forget them
            self._closed.intersection_update(names)
        for name in names:
            if name in self._held:
                continue
            if name in self._closed:
                ready.append(name)
                continue
            try:
                settles = os.lstat(self.spool / name).st_mtime + self.settle
            except FileNotFoundError:
                continue
            if settles <= now:
                ready.append(name)
            elif self._settles_at is None or settles < self._settles_at:
                self._settles_at = settles
        return ready

    def _take(self, path: Path, now: float) -> QueuedMessage | None:
        """Lock, check and read one file; None if it is gone, held elsewhere or refused."""
        try:
            seen = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(seen.st_mode):
            self._move_aside(path, "corrupt", f"not a regular file ({_kind(seen.st_mode)}); never opened")
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # gone, or replaced by something else since lstat: look next time
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            opened = os.fstat(fd)
            if not _same_file(opened, path):  # replaced, moved or sent meanwhile
                os.close(fd)
                return None
        except BlockingIOError:  # another relay is delivering it
            os.close(fd)
            return None
        state = self._read_state(path) if path.parent == self.dir("deferred") else {}
        if state.get("next_try", 0.0) > now:  # deferred again by another relay meanwhile
            self._deferred[path.name] = (state["next_try"], state.get("first_seen", now))
            os.close(fd)
            return None
        problem = self._refusal(opened, trusted=path.parent != self.spool)
        if problem is None:
            data = _read_all(fd, self.max_size + 1)
            if len(data) > self.max_size:
                problem = f"grew past max_size ({self.max_size}) while being read"
            try:
                envelope = split_envelope(data)
            except ValueError as e:
                problem = f"bad mailrelayd envelope: {e}"
        if problem is not None:
            self._move_aside(path, "corrupt", problem)
            os.close(fd)
            return None
        self._closed.discard(path.name)
        self._held[path.name] = _Held(fd, path)
        recorded = None  # (sender, recipients) recorded beside the message
        if envelope is not None:
            sender, recipients, data = envelope
            recorded = (sender, recipients)
        if state.get("recipients"):  # after a partial send, only those still to get it
            recorded = (recorded[0] if recorded else "", tuple(state["recipients"]))
        return QueuedMessage(id=path.name, data=data, attempts=state.get("attempts", 0),
                             first_seen=state.get("first_seen", now), envelope=recorded,
                             partial=bool(state.get("recipients")))

    def _refusal(self, st: os.stat_result, trusted: bool = False) -> str | None:
        """Why a file may not be read, or None. `trusted`: in our state directory, where only
        files already checked or written by the relay itself are (spool_owner does not apply)."""
        if not stat.S_ISREG(st.st_mode):
            return f"not a regular file ({_kind(st.st_mode)})"
        if st.st_nlink != 1:
            return f"has {st.st_nlink} hard links: it may be a link to a file outside the spool"
        if st.st_size == 0:
            return "empty file"
        if st.st_size > self.max_size:
            return f"{st.st_size} bytes, over max_size ({self.max_size})"
        if self.owner_uid is not None and st.st_uid != self.owner_uid and not trusted:
            return f"owned by uid {st.st_uid}, not {self.owner_uid} (spool_owner)"
        return None

    # -- moving files -------------------------------------------------------------

    def _move_aside(self, path: Path, where: str, reason: str, **details) -> None:
        target = free_name(self.dir(where), path.name)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return  # another relay moved it first
        if where == "corrupt":
            self.log.warning("message_refused", emailid=path.name, reason=reason, moved_to=str(target))
        lines = [f"reason: {reason}", *(f"{key}: {value}" for key, value in details.items())]
        write_durably(Path(f"{target}.reason"), ("\n".join(lines) + "\n").encode(), self.dir("tmp"))
        fsync_dir(path.parent)

    def _forget_deferred(self, path: Path) -> None:
        if path.parent == self.dir("deferred"):
            self._schedule(path).unlink(missing_ok=True)  # an orphan left by a crash: maintain() prunes it
            if self._deferred is not None:
                self._deferred.pop(path.name, None)

    def _schedule(self, deferred: Path) -> Path:
        """The state file of a deferred message: same name, its own directory, so that no
        message name can be mistaken for a state file."""
        return self.dir("schedule") / deferred.name

    def _read_state(self, path: Path) -> dict:
        if path.parent != self.dir("deferred"):
            return {}
        try:
            state = json.loads(self._schedule(path).read_bytes())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}  # no state yet (a crash between move and write): due now, no history

    @contextmanager
    def _finishing(self, held: _Held):
        """Record an outcome, then close the file, releasing its lock, whatever happens."""
        try:
            yield
        except OSError as e:
            raise QueueError(f"{self.spool}: {e.strerror or e}") from None
        finally:
            os.close(held.fd)


def _same_file(st: os.stat_result, path: Path) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _read_all(fd: int, limit: int) -> bytes:
    """At most `limit` bytes of the file."""
    chunks, total = [], 0
    while total < limit and (chunk := os.read(fd, min(limit - total, 1 << 20))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown kind"
