"""Fossil's spool directory (email-send-method=dir): one file per message.

The spool is written from inside a jail, so its content is hostile: an entry is only
read if it is a regular file with one link, opened without following links, no larger
than `max_size` and (optionally) owned by `owner_uid`; anything else is moved aside to
corrupt/ with the reason, unread. Fossil writes each file in place with no lock: a file
is only taken once whole (see writers.py: closed by a writer seen writing it, else settled),
and, where the kernel grants a read lease (writers.read_lease), while no process has it open
for writing; the lease is held while the file is read.

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
from mailrelayd.queues import Entry, QueuedMessage, QueueError, QueueStats, stored
from mailrelayd.queues.spool import admin
from mailrelayd.queues.spool.rules import READ_FLAGS, Rules, kind, number, read_all, same_file
from mailrelayd.queues.spool.state import SPOOL, DeferredIndex, SpoolState
from mailrelayd.queues.spool.writers import Writers, read_lease, release_lease
from mailrelayd.throttle import Throttle

LIST_BATCH = 4096  # oldest names taken from one listing: memory stays flat however long the backlog
WRITER_RECHECK = 0.5  # seconds: look again this soon at a file a writer was proven to hold open


@dataclass
class _Held:
    fd: int
    where: str  # SPOOL or "deferred"
    name: str


class SpoolQueue:
    def __init__(self, spool: Path, state: Path | None = None, *, settle: float = 2.0,
                 max_size: int = 25 * 2**20, owner_uid: int | None = None, keep_sent: bool = False,
                 sentlog_retention: float = 30 * 86400, refused_retention: float = 30 * 86400):
        self.spool = spool = spool.absolute()
        self.state = SpoolState(spool, (state or spool.with_name(spool.name + ".mailrelayd")).absolute())
        self.name = str(spool)
        self.lock_path = spool.with_name(spool.name + ".mailrelayd.lock")
        self.watch_dir = spool
        self.settle = settle
        self._writers = Writers(settle)
        self.rules = Rules(max_size, owner_uid)
        self.keep_sent = keep_sent
        self.sent_record = "sent messages" if keep_sent else None
        self.sentlog_retention = sentlog_retention
        self.refused_retention = refused_retention
        self.refused = 0
        self._held: dict[str, _Held] = {}
        self._deferred = DeferredIndex(self.state)
        self._ready: deque[tuple[str, bool]] = deque()  # (name, needs a lease's proof), oldest first
        self._settles_at: float | None = None  # when the next unsettled new file may be taken
        self.log = get_logger(queue=self.name)
        self._refused = Throttle(self.log, "message_refused")  # a flood is said as a count
        self._not_refused = Throttle(self.log, "message_not_refused", level="error")
        self._repaired = Throttle(self.log, "queue_state_repaired",
                                  note="the schedule was not as mailrelayd wrote it: the message starts afresh")
        self._throttles = (self._refused, self._not_refused, self._repaired)

    # -- opening -----------------------------------------------------------------

    def open(self, read_only: bool = False) -> None:
        """Open the spool, then the state directories (created if missing, on its file system;
        `read_only`: only those there, to look: see SpoolState.open)."""
        self.state.open(read_only)

    def close(self) -> None:
        for held in self._held.values():
            os.close(held.fd)
        self._held.clear()
        self.state.close()

    def notice(self, kind: str, path: str) -> bool:
        directory, _, name = path.rpartition("/")
        if directory != str(self.spool) or name.startswith("."):
            return False
        return self._writers.saw(kind, name)  # only a close wakes the relay: a write alone makes nothing whole

    # -- claim and acknowledge ----------------------------------------------------

    def claim(self, now: float, limit: int) -> list[QueuedMessage]:
        for throttle in self._throttles:  # say what a flood held back, once its minute is over
            throttle.flush()
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
                else:
                    name, need_proof = self._ready.popleft()
                    if msg := self._take(SPOOL, name, now, need_proof):
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
        with self._os_errors():
            return admin.stats(self, now)

    def deferred_times(self, now: float):
        """(next try, first seen) of each deferred message, as the relay knows them."""
        return list(self._deferred.times(now).values())

    def mark_sent(self, sent: list[tuple[QueuedMessage, Envelope | None]], now: float) -> None:
        for msg, _ in sent:
            if (held := self._held.get(str(msg.id))) is None:
                continue  # recorded already (with others whose recording failed)
            with self._recording(str(msg.id), held):
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
        if (held := self._held.get(str(msg.id))) is None:
            return
        with self._recording(str(msg.id), held):
            if held.where != "deferred":  # moved first: a later try finds it there
                moved = self.state.move_in(self.state.fd(held.where), held.name, "deferred")
                held.where, held.name = "deferred", moved or held.name
            name = held.name
            state = {"attempts": msg.attempts + 1, "first_seen": msg.first_seen, "next_try": next_try,
                     "last_try": now, "last_error": error}
            remaining = recipients if recipients is not None else self.state.schedule(name).get("recipients")
            if remaining:  # after a partial send, only these are still to get it
                state["recipients"] = list(remaining)
            self.state.write_schedule(name, state)
            self._deferred.set(name, next_try, msg.first_seen)

    def set_aside(self, msg: QueuedMessage, reason: str, now: float,
                  recipients: tuple[str, ...] | None = None) -> None:
        extra = {"recipients": ", ".join(recipients)} if recipients is not None else {}
        if (held := self._held.get(str(msg.id))) is None:
            return
        with self._recording(str(msg.id), held):
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
        """Prune kept sent files and refused entries past their retention, orphan schedules
        and stale temporaries; say what floods of refusals were held back."""
        for throttle in self._throttles:
            throttle.flush()
        try:
            self.state.prune("sent", now - self.sentlog_retention)
            self.state.prune("corrupt", now - self.refused_retention)
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

    def sent_times(self, since: float, limit: int) -> list[float]:
        if not self.keep_sent:
            return []
        with self._os_errors():
            times = [st.st_mtime for n in self.state.names("sent") if (st := self.state.lstat("sent", n))]
        return sorted(t for t in times if t >= since)[-limit:]

    def interrupt(self) -> None:
        pass  # nothing here runs long: each step is one system call

    def rescan(self) -> None:
        """Read the deferred index again at the next claim (an administrator changed it)."""
        self._deferred.stale()

    # -- finding work -------------------------------------------------------------

    def _list_ready(self, now: float) -> list[tuple[str, bool]]:
        """(name, needs a lease's proof) of the spool's whole files, oldest first."""
        names = heapq.nsmallest(LIST_BATCH, (n for n in os.listdir(self.state.fd(SPOOL)) if not n.startswith(".")))
        ready, self._settles_at = self._writers.whole(
            (n for n in names if n not in self._held), lambda n: self.state.lstat(SPOOL, n),
            lambda n: self.state.exists(SPOOL, n), now)
        return ready

    def _take(self, where: str, name: str, now: float, need_proof: bool = False) -> QueuedMessage | None:
        """Lock, check and read one file; None if it is gone, held elsewhere, still held open
        by a writer (or, with `need_proof`, not proven closed by a lease), or refused."""
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
            msg = self._check_and_read(fd, where, name, now, need_proof)
        except BaseException:
            os.close(fd)
            raise
        if msg is None:
            os.close(fd)
            return None
        self._writers.taken(name)
        self._held[name] = _Held(fd, where, name)
        return msg

    def _check_and_read(self, fd: int, where: str, name: str, now: float, need_proof: bool) -> QueuedMessage | None:
        """The message in the open file `fd`, or None (held elsewhere, replaced, still held
        open by a writer or not proven closed when `need_proof`, not due, refused)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another relay is delivering it
            return None
        opened = os.fstat(fd)
        if not same_file(opened, name, self.state.fd(where)):  # replaced, moved or sent meanwhile
            return None
        leased = read_lease(fd) if where == SPOOL else None
        if leased is False or (leased is None and need_proof):
            if leased is False:  # look again soon, even with no file event to say it was closed
                if self._writers.held_open(name):
                    self.log.info("message_waiting_for_writer", emailid=name)
                recheck = now + WRITER_RECHECK
                self._settles_at = recheck if self._settles_at is None else min(self._settles_at, recheck)
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
        if leased:  # read whole while no writer could open it; release at once
            release_lease(fd)
        if problem is not None:
            self._refuse(where, name, problem)
            return None
        recorded = None  # (sender, recipients) recorded beside the message
        if envelope is not None:
            sender, recipients, data = envelope
            recorded = (sender, recipients)
        past, problem = stored.history(schedule.get("attempts", 0), schedule.get("first_seen", now),
                                       schedule.get("recipients"), now)
        if problem is not None:
            self._repaired(emailid=name, problem=problem)
        if past.recipients:  # after a partial send, only those still to get it
            recorded = (recorded[0] if recorded else "", past.recipients)
        return QueuedMessage(id=name, data=data, attempts=past.attempts, first_seen=past.first_seen,
                             envelope=recorded, partial=bool(past.recipients))

    # -- moving files -------------------------------------------------------------

    def _refuse(self, where: str, name: str, reason: str) -> None:
        """Move an entry to corrupt/, unread, with the reason."""
        try:
            target = self.state.set_aside(self.state.fd(where), name, "corrupt", reason)
        except OSError as e:
            self._not_refused(emailid=name, reason=reason, error=e.strerror or str(e))
            return
        if target is not None:
            self.refused += 1
            self._refused(emailid=name, reason=reason, moved_to=f"{self.state.root}/corrupt/{target}")

    def _forget_deferred(self, held: _Held) -> None:
        if held.where == "deferred":
            self.state.unlink("schedule", held.name)  # an orphan left by a crash: maintain() prunes it
            self._deferred.forget(held.name)

    @contextmanager
    def _recording(self, key: str, held: _Held):
        """Record an outcome for a held file; only once it is recorded, close the file and
        so release its lock. If recording fails (a full disk, a spool made unwritable), the
        file stays held: recording it again later finds it still held."""
        with self._os_errors():
            yield
        del self._held[key]
        os.close(held.fd)

    @contextmanager
    def _os_errors(self):
        try:
            yield
        except OSError as e:
            raise QueueError(f"{self.spool}: {e.strerror or e}") from None
