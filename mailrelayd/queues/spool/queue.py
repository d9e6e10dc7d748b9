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
the same file system so that every move is an atomic rename (see SpoolState).

Messages of the relay's own (`add`) are written straight into STATE/deferred, due at once:
they are trusted, so neither settle nor spool_owner applies to them.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import stat
from collections import deque
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mailrelayd.inject import spool_file_name, split_envelope
from mailrelayd.log import get_logger
from mailrelayd.message import Envelope
from mailrelayd.queues import Entry, QueuedMessage, QueueError, QueueStats
from mailrelayd.queues.spool import admin
from mailrelayd.queues.spool.state import SpoolState, read_all

RESCAN_DEFERRED = 60.0  # seconds: notice messages other relays (or an admin) deferred
LIST_BATCH = 4096  # oldest names taken from one listing: memory stays flat however long the backlog
OLDEST_PROBE = 64  # new files whose age stats() looks at: those with the smallest names
SPOOL = "spool"  # where a held file is: the spool itself, or a state subdirectory


@dataclass
class _Held:
    fd: int
    where: str  # SPOOL or "deferred"
    name: str


class SpoolQueue:
    def __init__(self, spool: Path, state: Path | None = None, *, settle: float = 2.0,
                 max_size: int = 25 * 2**20, owner_uid: int | None = None, keep_sent: bool = False,
                 sentlog_retention: float = 30 * 86400):
        self.spool = spool = spool.absolute()
        self.state = SpoolState((state or spool.with_name(spool.name + ".mailrelayd")).absolute())
        self.name = str(spool)
        self.lock_path = spool.with_name(spool.name + ".mailrelayd.lock")
        self.watch_dir = spool
        self.settle = settle
        self.max_size = max_size
        self.owner_uid = owner_uid
        self.keep_sent = keep_sent
        self.sent_record = "sent messages" if keep_sent else None
        self.sentlog_retention = sentlog_retention
        self._spool_fd: int | None = None
        self._closed: set[str] = set()  # names whose writer has closed them (watcher's thread)
        self._held: dict[str, _Held] = {}
        self._deferred: dict[str, tuple[float, float]] | None = None  # name -> (next try, first seen)
        self._deferred_scanned = float("-inf")
        self._ready: deque[str] = deque()  # complete new files from the last listing, oldest first
        self._settles_at: float | None = None  # when the next unsettled new file may be taken
        self.log = get_logger(queue=self.name)

    # -- opening -----------------------------------------------------------------

    def open(self) -> None:
        """Open the spool, then the state directories (created if missing, on its file system)."""
        if self._spool_fd is not None:
            return
        try:
            fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise QueueError(f"{self.spool}: no such directory") from None
        except NotADirectoryError:
            raise QueueError(f"{self.spool}: not a directory") from None
        except OSError as e:
            raise QueueError(f"{self.spool}: {e.strerror}") from None
        try:
            self.state.open(os.fstat(fd).st_dev)
        except BaseException:
            os.close(fd)
            raise
        self._spool_fd = fd

    def close(self) -> None:
        for held in self._held.values():
            os.close(held.fd)
        self._held.clear()
        self.state.close()
        if self._spool_fd is not None:
            os.close(self._spool_fd)
            self._spool_fd = None

    def notice(self, kind: str, path: str) -> bool:
        directory, _, name = path.rpartition("/")
        if directory != str(self.spool) or name.startswith("."):
            return False
        if kind in ("closed", "moved"):  # written and closed, or renamed in whole
            self._closed.add(name)
        return True

    def dir_fd(self, where: str) -> int:
        if where == SPOOL:
            if self._spool_fd is None:
                raise QueueError(f"{self.spool}: not open")
            return self._spool_fd
        return self.state.fd(where)

    # -- claim and acknowledge ----------------------------------------------------

    def claim(self, now: float, limit: int) -> list[QueuedMessage]:
        claimed: list[QueuedMessage] = []
        try:
            for name in self._due_deferred(now):
                if len(claimed) >= limit:
                    break
                if msg := self._take("deferred", name, now):
                    claimed.append(msg)
                elif not self.state.exists("deferred", name):  # sent or set aside by another relay
                    self._index(now).pop(name, None)
            listed = False
            while len(claimed) < limit:
                if not self._ready:  # the directory is listed only once the last listing is used up
                    if listed:
                        break
                    self._ready.extend(self._list_ready(now))
                    listed = True
                elif msg := self._take(SPOOL, self._ready.popleft(), now):
                    claimed.append(msg)
        except OSError as e:
            self.release(claimed)
            raise QueueError(f"{self.spool}: {e.strerror or e}") from None
        return claimed

    def add(self, data: bytes, now: float) -> str:
        """Write a message of the relay's own into deferred/, with a schedule due now (first
        the message, so that a crash leaves at worst a message with no history, due now)."""
        try:
            name = self.state.free_name("deferred", spool_file_name())
            self.state.write("deferred", name, data)
            self.state.write_schedule(name, {"attempts": 0, "first_seen": now, "next_try": now, "last_try": None,
                                             "last_error": None})
        except OSError as e:
            raise QueueError(f"{self.state.root}: {e.strerror or e}") from None
        if self._deferred is not None:
            self._deferred[name] = (now, now)
        return name

    def stats(self, now: float) -> QueueStats:
        """The counts from directory listings and the deferred index (which may be up to
        RESCAN_DEFERRED seconds behind other processes' changes). A new file's age is its
        mtime; only the OLDEST_PROBE smallest names are looked at (Fossil's and
        mailrelayd-sendmail's names start with the time they were written). With keep_sent,
        sent_24h stats every kept file."""
        try:
            new = [n for n in os.listdir(self.dir_fd(SPOOL)) if not n.startswith(".")]
            times = []
            for name in heapq.nsmallest(OLDEST_PROBE, new):
                try:
                    times.append(os.stat(name, dir_fd=self.dir_fd(SPOOL), follow_symlinks=False).st_mtime)
                except FileNotFoundError:
                    pass
            deferred = self._index(now).values()
            later = [t for t, _ in deferred if t > now]
            times += [first_seen for _, first_seen in deferred]
            names = set(self.state.names("failed"))
            failed = sum(1 for n in names if not (n.endswith(".reason") and n[:-7] in names))
            sent = None
            if self.keep_sent:
                sent = sum(1 for n in self.state.names("sent")
                           if (st := self.state.lstat("sent", n)) and st.st_mtime >= now - 86400)
        except OSError as e:
            raise QueueError(f"{self.state.root}: {e.strerror or e}") from None
        oldest = min(times, default=None)
        return QueueStats(queued=len(new) + len(deferred) - len(later), deferred=len(later), failed=failed,
                          sent_24h=sent, oldest_queued_s=None if oldest is None else max(0.0, now - oldest),
                          next_try=min(later, default=None))

    def mark_sent(self, sent: list[tuple[QueuedMessage, Envelope | None]], now: float) -> None:
        for msg, _ in sent:
            held = self._held.pop(str(msg.id))
            with self._finishing(held):
                src = self.dir_fd(held.where)
                if self.keep_sent:
                    kept = self.state.move_in(src, held.name, "sent")
                    if kept is not None:  # kept for sentlog_retention from now, not from its writing
                        os.utime(kept, (now, now), dir_fd=self.state.fd("sent"), follow_symlinks=False)
                else:  # an unlink lost in a power cut can only mean a message sent twice
                    os.unlink(held.name, dir_fd=src)
                self._forget_deferred(held)

    def defer(self, msg: QueuedMessage, error: str, next_try: float, now: float,
              recipients: tuple[str, ...] | None = None) -> None:
        held = self._held.pop(str(msg.id))
        with self._finishing(held):
            name = held.name
            if held.where != "deferred":
                name = self.state.move_in(self.dir_fd(held.where), held.name, "deferred") or name
            state = {"attempts": msg.attempts + 1, "first_seen": msg.first_seen, "next_try": next_try,
                     "last_try": now, "last_error": error}
            remaining = recipients if recipients is not None else self.state.schedule(name).get("recipients")
            if remaining:  # after a partial send, only these are still to get it
                state["recipients"] = list(remaining)
            self.state.write_schedule(name, state)
            if self._deferred is not None:
                self._deferred[name] = (next_try, msg.first_seen)

    def set_aside(self, msg: QueuedMessage, reason: str, now: float,
                  recipients: tuple[str, ...] | None = None) -> None:
        held = self._held.pop(str(msg.id))
        extra = {"recipients": ", ".join(recipients)} if recipients is not None else {}
        with self._finishing(held):
            self.state.set_aside(self.dir_fd(held.where), held.name, "failed", reason, attempts=msg.attempts + 1,
                                 first_seen=msg.first_seen, failed_at=now, **extra)
            self._forget_deferred(held)

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
        """Prune kept sent files past the retention, orphan schedules and stale temporaries."""
        try:
            self.state.prune("sent", now - self.sentlog_retention)
            deferred = set(self.state.names("deferred"))
            for name in self.state.names("schedule"):
                if name not in deferred:
                    self.state.unlink("schedule", name)
            self.state.prune("tmp", now - 3600)
        except OSError as e:
            raise QueueError(f"{self.state.root}: {e.strerror or e}") from None

    # -- administration (mailrelayd list, show, retry, purge) ----------------------------

    def entries(self, states: Collection[str], now: float) -> list[Entry]:
        with self._os_errors():
            return admin.entries(self, set(states), now)

    def find(self, ident: str, now: float) -> Entry | None:
        if "/" in ident or ident.startswith(".") or "\0" in ident:
            return None
        with self._os_errors():
            found = admin.entries(self, {"new", "deferred", "failed", "refused"}, now, only=ident)
        return found[0] if found else None

    def make_due(self, ids: Sequence[str] | None, now: float) -> list[str]:
        with self._os_errors():
            done = admin.make_due(self, ids, now)
        if self._deferred is not None:
            for name in done:
                self._deferred[name] = (now, self._deferred.get(name, (now, now))[1])
        return done

    def requeue(self, ids: Sequence[str] | None, now: float) -> list[tuple[str, str]]:
        with self._os_errors():
            return admin.requeue(self, ids, now)

    def purge_failed(self, ids: Sequence[str] | None, before: float) -> list[str]:
        with self._os_errors():
            return self.state.prune("failed", before if ids is None else float("inf"), ids and list(ids))

    def purge_sent(self, before: float) -> list[str]:
        with self._os_errors():
            return self.state.prune("sent", before)

    def purge_refused(self, before: float) -> list[str]:
        with self._os_errors():
            return self.state.prune("corrupt", before)

    def rescan(self) -> None:
        """Read the deferred index again at the next claim (an administrator changed it)."""
        self._deferred_scanned = float("-inf")

    # -- finding work -------------------------------------------------------------

    def _index(self, now: float) -> dict[str, tuple[float, float]]:
        """(next try, first seen) of each deferred name, kept up to date by our own changes
        and read again from disk every RESCAN_DEFERRED seconds (for other relays' changes)."""
        if self._deferred is None or now - self._deferred_scanned >= RESCAN_DEFERRED:
            self._deferred = {}
            for name in self.state.names("deferred"):
                schedule = self.state.schedule(name)
                st = self.state.lstat("deferred", name)
                if st is None:
                    continue
                # no schedule (a crash between move and write): since the file was written
                self._deferred[name] = (_number(schedule.get("next_try"), 0.0),
                                        _number(schedule.get("first_seen"), st.st_mtime))
            self._deferred_scanned = now
        return self._deferred

    def _due_deferred(self, now: float) -> list[str]:
        """Deferred names due by now, soonest first."""
        due = [(t, name) for name, (t, _) in self._index(now).items() if t <= now and name not in self._held]
        return [name for _, name in sorted(due)]

    def _list_ready(self, now: float) -> list[str]:
        """Names in the spool that are complete: closed by their writer, or settled."""
        ready, self._settles_at = [], None
        spool_fd = self.dir_fd(SPOOL)
        names = heapq.nsmallest(LIST_BATCH, (n for n in os.listdir(spool_fd) if not n.startswith(".")))
        if len(self._closed) > 10_000:  # names that others took: forget them
            self._closed.intersection_update(names)
        for name in names:
            if name in self._held:
                continue
            if name in self._closed:
                ready.append(name)
                continue
            try:
                settles = os.stat(name, dir_fd=spool_fd, follow_symlinks=False).st_mtime + self.settle
            except FileNotFoundError:
                continue
            if settles <= now:
                ready.append(name)
            elif self._settles_at is None or settles < self._settles_at:
                self._settles_at = settles
        return ready

    def _take(self, where: str, name: str, now: float) -> QueuedMessage | None:
        """Lock, check and read one file; None if it is gone, held elsewhere or refused."""
        dir_fd = self.dir_fd(where)
        try:
            seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(seen.st_mode):
            self._refuse(where, name, f"not a regular file ({_kind(seen.st_mode)}); never opened")
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:  # gone, or replaced by something else since the stat: look next time
            return None
        try:
            msg = self._check_and_read(fd, where, name, now)
        except BaseException:
            os.close(fd)
            raise
        if msg is None:
            os.close(fd)
            return None
        self._closed.discard(name)
        self._held[name] = _Held(fd, where, name)
        return msg

    def _check_and_read(self, fd: int, where: str, name: str, now: float) -> QueuedMessage | None:
        """The message in the open file `fd`, or None (held elsewhere, replaced, not due, refused)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another relay is delivering it
            return None
        opened = os.fstat(fd)
        if not _same_file(opened, name, self.dir_fd(where)):  # replaced, moved or sent meanwhile
            return None
        schedule = self.state.schedule(name) if where == "deferred" else {}
        next_try = _number(schedule.get("next_try"), 0.0)
        if next_try > now:  # deferred again by another relay meanwhile
            self._index(now)[name] = (next_try, _number(schedule.get("first_seen"), now))
            return None
        problem = self.refusal(opened, trusted=where != SPOOL)
        envelope = None
        if problem is None:
            data = read_all(fd, self.max_size + 1)
            if len(data) > self.max_size:
                problem = f"grew past max_size ({self.max_size}) while being read"
            try:
                envelope = split_envelope(data)
            except ValueError as e:
                problem = f"bad mailrelayd envelope: {e}"
        if problem is not None:
            self._refuse(where, name, problem)
            return None
        recorded = None  # (sender, recipients) recorded beside the message
        if envelope is not None:
            sender, recipients, data = envelope
            recorded = (sender, recipients)
        remaining = schedule.get("recipients")
        if remaining:  # after a partial send, only those still to get it
            recorded = (recorded[0] if recorded else "", tuple(remaining))
        return QueuedMessage(id=name, data=data, attempts=int(_number(schedule.get("attempts"), 0)),
                             first_seen=_number(schedule.get("first_seen"), now), envelope=recorded,
                             partial=bool(remaining))

    def refusal(self, st: os.stat_result, trusted: bool = False) -> str | None:
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

    def _refuse(self, where: str, name: str, reason: str) -> None:
        """Move an entry to corrupt/, unread, with the reason."""
        try:
            target = self.state.set_aside(self.dir_fd(where), name, "corrupt", reason)
        except OSError as e:
            self.log.error("message_not_refused", emailid=name, reason=reason, error=e.strerror or str(e))
            return
        if target is not None:
            self.log.warning("message_refused", emailid=name, reason=reason,
                             moved_to=f"{self.state.root}/corrupt/{target}")

    def _forget_deferred(self, held: _Held) -> None:
        if held.where == "deferred":
            self.state.unlink("schedule", held.name)  # an orphan left by a crash: maintain() prunes it
            if self._deferred is not None:
                self._deferred.pop(held.name, None)

    @contextmanager
    def _finishing(self, held: _Held):
        """Record an outcome, then close the file, releasing its lock, whatever happens."""
        try:
            with self._os_errors():
                yield
        finally:
            os.close(held.fd)

    @contextmanager
    def _os_errors(self):
        try:
            yield
        except OSError as e:
            raise QueueError(f"{self.spool}: {e.strerror or e}") from None


def _same_file(st: os.stat_result, name: str, dir_fd: int) -> bool:
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _number(value, default: float) -> float:
    """A number read from a schedule, or `default` for anything else (it is not ours to trust)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return float(value)
    return default


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown kind"
