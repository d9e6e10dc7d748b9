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
import math
import os
import stat
from collections import deque
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mailrelayd.inject import split_envelope, spool_file_name
from mailrelayd.log import get_logger
from mailrelayd.message import Envelope
from mailrelayd.queues import Entry, QueuedMessage, QueueError, QueueStats
from mailrelayd.queues.spool import admin
from mailrelayd.queues.spool.rules import READ_FLAGS, Rules, kind, number, read_all, same_file
from mailrelayd.queues.spool.state import SPOOL, DeferredIndex, SpoolState

LIST_BATCH = 4096  # oldest names taken from one listing: memory stays flat however long the backlog
OLDEST_PROBE = 64  # new files whose age stats() looks at: those with the smallest names


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
        self.state = SpoolState(spool, (state or spool.with_name(spool.name + ".mailrelayd")).absolute())
        self.name = str(spool)
        self.lock_path = spool.with_name(spool.name + ".mailrelayd.lock")
        self.watch_dir = spool
        self.settle = settle
        self.rules = Rules(max_size, owner_uid)
        self.keep_sent = keep_sent
        self.sent_record = "sent messages" if keep_sent else None
        self.sentlog_retention = sentlog_retention
        self._closed: set[str] = set()  # names whose writer has closed them (watcher's thread)
        self._held: dict[str, _Held] = {}
        self._deferred = DeferredIndex(self.state)
        self._ready: deque[str] = deque()  # complete new files from the last listing, oldest first
        self._settles_at: float | None = None  # when the next unsettled new file may be taken
        self.log = get_logger(queue=self.name)

    # -- opening -----------------------------------------------------------------

    def open(self) -> None:
        """Open the spool, then the state directories (created if missing, on its file system)."""
        self.state.open()

    def close(self) -> None:
        for held in self._held.values():
            os.close(held.fd)
        self._held.clear()
        self.state.close()

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
            for name in self._deferred.due(now, self._held):
                if len(claimed) >= limit:
                    break
                if msg := self._take("deferred", name, now):
                    claimed.append(msg)
                elif not self.state.exists("deferred", name):  # sent or set aside by another relay
                    self._deferred.forget(name)
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
        self._deferred.set(name, now, now)
        return name

    def stats(self, now: float) -> QueueStats:
        """The counts from directory listings and the deferred index (which may be up to
        RESCAN_DEFERRED seconds behind other processes' changes). A new file's age is its
        mtime; only the OLDEST_PROBE smallest names are looked at (Fossil's and
        mailrelayd-sendmail's names start with the time they were written). With keep_sent,
        sent_24h stats every kept file."""
        try:
            new = self.state.names(SPOOL)
            times = []
            for name in heapq.nsmallest(OLDEST_PROBE, new):
                try:
                    times.append(os.stat(name, dir_fd=self.state.fd(SPOOL), follow_symlinks=False).st_mtime)
                except FileNotFoundError:
                    pass
            deferred = self._deferred.times(now).values()
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
                src = self.state.fd(held.where)
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
                name = self.state.move_in(self.state.fd(held.where), held.name, "deferred") or name
            state = {"attempts": msg.attempts + 1, "first_seen": msg.first_seen, "next_try": next_try,
                     "last_try": now, "last_error": error}
            remaining = recipients if recipients is not None else self.state.schedule(name).get("recipients")
            if remaining:  # after a partial send, only these are still to get it
                state["recipients"] = list(remaining)
            self.state.write_schedule(name, state)
            self._deferred.set(name, next_try, msg.first_seen)

    def set_aside(self, msg: QueuedMessage, reason: str, now: float,
                  recipients: tuple[str, ...] | None = None) -> None:
        held = self._held.pop(str(msg.id))
        extra = {"recipients": ", ".join(recipients)} if recipients is not None else {}
        with self._finishing(held):
            self.state.set_aside(self.state.fd(held.where), held.name, "failed", reason, attempts=msg.attempts + 1,
                                 first_seen=msg.first_seen, failed_at=now, **extra)
            self._forget_deferred(held)

    def release(self, msgs: list[QueuedMessage]) -> None:
        for msg in msgs:
            held = self._held.pop(str(msg.id), None)
            if held is not None:
                os.close(held.fd)

    def next_due(self, now: float) -> float | None:
        times = [t for t in (self._deferred.next_try(self._held), self._settles_at) if t is not None]
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
        for name in done:
            self._deferred.set(name, now)
        return done

    def requeue(self, ids: Sequence[str] | None, now: float) -> list[tuple[str, str]]:
        with self._os_errors():
            return admin.requeue(self, ids, now)

    def purge_failed(self, ids: Sequence[str] | None, before: float) -> list[str]:
        with self._os_errors():
            return self.state.prune("failed", before if ids is None else math.inf, None if ids is None else list(ids))

    def purge_sent(self, before: float) -> list[str]:
        with self._os_errors():
            return self.state.prune("sent", before)

    def purge_refused(self, before: float) -> list[str]:
        with self._os_errors():
            return self.state.prune("corrupt", before)

    def rescan(self) -> None:
        """Read the deferred index again at the next claim (an administrator changed it)."""
        self._deferred.stale()

    # -- finding work -------------------------------------------------------------

    def _list_ready(self, now: float) -> list[str]:
        """Names in the spool that are complete: closed by their writer, or settled."""
        ready, self._settles_at = [], None
        spool_fd = self.state.fd(SPOOL)
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
        dir_fd = self.state.fd(where)
        try:
            seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(seen.st_mode):
            self._refuse(where, name, f"not a regular file ({kind(seen.st_mode)}); never opened")
            return None
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
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
        if not same_file(opened, name, self.state.fd(where)):  # replaced, moved or sent meanwhile
            return None
        schedule = self.state.schedule(name) if where == "deferred" else {}
        next_try = number(schedule.get("next_try"), 0.0)
        if next_try > now:  # deferred again by another relay meanwhile
            self._deferred.set(name, next_try, number(schedule.get("first_seen"), now))
            return None
        problem = self.rules.refusal(opened, trusted=where != SPOOL)
        envelope = None
        if problem is None:
            data = read_all(fd, self.rules.max_size + 1)
            if len(data) > self.rules.max_size:
                problem = f"grew past max_size ({self.rules.max_size}) while being read"
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
        return QueuedMessage(id=name, data=data, attempts=int(number(schedule.get("attempts"), 0)),
                             first_seen=number(schedule.get("first_seen"), now), envelope=recorded,
                             partial=bool(remaining))

    # -- moving files -------------------------------------------------------------

    def _refuse(self, where: str, name: str, reason: str) -> None:
        """Move an entry to corrupt/, unread, with the reason."""
        try:
            target = self.state.set_aside(self.state.fd(where), name, "corrupt", reason)
        except OSError as e:
            self.log.error("message_not_refused", emailid=name, reason=reason, error=e.strerror or str(e))
            return
        if target is not None:
            self.log.warning("message_refused", emailid=name, reason=reason,
                             moved_to=f"{self.state.root}/corrupt/{target}")

    def _forget_deferred(self, held: _Held) -> None:
        if held.where == "deferred":
            self.state.unlink("schedule", held.name)  # an orphan left by a crash: maintain() prunes it
            self._deferred.forget(held.name)

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
