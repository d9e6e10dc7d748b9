"""Administration of a spool queue: list, find, make due and put back.

Files are read under the relay's own rules (never through a link, never a FIFO, one link
only, no larger than max_size, spool_owner for new files), through the directory
descriptors the queue holds. Moves are atomic renames; a schedule is written before the
message it belongs to is moved, so a crash leaves at worst an orphan schedule.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mailrelayd.inject import is_plain_address, split_envelope
from mailrelayd.queues import Entry, QueueStats
from mailrelayd.queues.spool.rules import READ_FLAGS, number, read_all
from mailrelayd.queues.spool.state import SPOOL

OLDEST_PROBE = 64  # new files whose age stats() looks at: those with the smallest names

if TYPE_CHECKING:
    from mailrelayd.queues.spool.queue import SpoolQueue

def entries(queue: SpoolQueue, states: set[str], now: float, only: str | None = None) -> list[Entry]:
    """The messages in `states` (new, deferred, failed, refused); with `only`, just that name."""
    state, found = queue.state, []

    def names(where: str) -> list[str]:
        listed = [n for n in state.names(where) if not (where in ("failed", "corrupt") and n.endswith(".reason"))]
        return [n for n in listed if only is None or n == only]

    if states & {"new", "deferred"}:
        for name in names("deferred"):
            schedule = state.schedule(name)
            next_try = number(schedule.get("next_try"))
            kind = "deferred" if next_try is not None and next_try > now else "new"
            if kind in states and (read := _read(queue, "deferred", name)):
                data, size, sender, recipients, problem, mtime = read
                found.append(Entry(name, kind, data, size, sender, _addresses(schedule.get("recipients")) or recipients,
                                   int(number(schedule.get("attempts")) or 0),
                                   number(schedule.get("first_seen")) or mtime, number(schedule.get("last_try")),
                                   next_try, _text(schedule.get("last_error")) or problem))
    if "new" in states:
        for name in names(SPOOL):
            if read := _read(queue, SPOOL, name):
                data, size, sender, recipients, problem, mtime = read
                found.append(Entry(name, "new", data, size, sender, recipients, first_seen=mtime,
                                   last_error=problem and f"will be refused: {problem}"))
    for kind, where in (("failed", "failed"), ("refused", "corrupt")):
        if kind not in states:
            continue
        for name in names(where):
            reason = state.reason(where, name)
            read = _read(queue, where, name) if kind == "failed" else None
            st = state.lstat(where, name)
            if st is None:
                continue
            data, size, sender, recipients = read[:4] if read else (b"", st.st_size, None, None)
            recipients = _addresses(reason.get("recipients", "").split(",")) or recipients
            marked = state.lstat(where, f"{name}.reason")
            failed_at = number(reason.get("failed_at")) or (marked or st).st_mtime
            found.append(Entry(name, kind, data, size, sender, recipients,
                               int(number(reason.get("attempts")) or 0), number(reason.get("first_seen")),
                               last_try=failed_at if kind == "failed" else None,  # the try that failed it
                               reason=reason.get("reason", "?"), failed_at=failed_at))
    return found


def make_due(queue: SpoolQueue, ids: Sequence[str] | None, now: float) -> list[str]:
    """Rewrite each deferred message's schedule with next_try = now (atomically)."""
    state, done = queue.state, []
    for name in state.names("deferred"):
        if ids is not None and name not in ids:
            continue
        schedule = state.schedule(name)
        next_try = number(schedule.get("next_try"))
        if not schedule or next_try is None or next_try <= now:
            continue
        state.write_schedule(name, {**schedule, "next_try": now})
        done.append(name)
    return done


def requeue(queue: SpoolQueue, ids: Sequence[str] | None, now: float) -> list[tuple[str, str]]:
    """Each failed message back into the spool by rename, then its .reason removed.

    One that reached some recipients (a partial send) goes to deferred/ instead, with a
    schedule naming only those still to get it (written first, so a crash leaves the
    message in failed/ and at worst an orphan schedule that the relay prunes).
    """
    state, done = queue.state, []
    failed_fd, spool_fd = state.fd("failed"), state.fd(SPOOL)
    for name in state.names("failed"):
        if name.endswith(".reason") or (ids is not None and name not in ids):
            continue
        reason = state.reason("failed", name)
        recipients = _addresses(reason.get("recipients", "").split(","))
        if recipients:
            target = state.free_name("deferred", name)
            state.write_schedule(target, {"attempts": 0, "first_seen": number(reason.get("first_seen")) or now,
                                          "next_try": now, "last_try": None, "last_error": reason.get("reason"),
                                          "recipients": list(recipients)})
            os.rename(name, target, src_dir_fd=failed_fd, dst_dir_fd=state.fd("deferred"))
            os.fsync(state.fd("deferred"))
        else:
            target, n = name, 0
            while state.exists(SPOOL, target):
                n += 1
                target = f"{name}.{n}"
            os.rename(name, target, src_dir_fd=failed_fd, dst_dir_fd=spool_fd)
            os.fsync(spool_fd)
        os.fsync(failed_fd)
        state.unlink("failed", f"{name}.reason")
        done.append((name, target))
    return done


def _read(queue: SpoolQueue, where: str, name: str):
    """(data, size, sender, recipients, problem, mtime) of one entry, read as the relay would
    read it (`problem`: why the relay would refuse it, and then no data); None if it is gone."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=queue.state.fd(where))
    except FileNotFoundError:
        return None
    except OSError as e:
        return b"", 0, None, None, e.strerror or str(e), 0.0
    try:
        st = os.fstat(fd)
        problem = queue.rules.refusal(st, trusted=where != SPOOL)
        if problem is not None:
            return b"", st.st_size, None, None, problem, st.st_mtime
        data = read_all(fd, queue.rules.max_size)
    finally:
        os.close(fd)
    try:
        envelope = split_envelope(data)
    except ValueError as e:
        return b"", len(data), None, None, f"bad mailrelayd envelope: {e}", st.st_mtime
    if envelope is None:
        return data, len(data), None, None, None, st.st_mtime
    sender, recipients, message = envelope
    return message, len(data), sender, recipients, None, st.st_mtime


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _addresses(values) -> tuple[str, ...] | None:
    """The plain addresses in a recorded list (JSON list, or the items of a .reason line)."""
    if not isinstance(values, list):
        return None
    found = tuple(v.strip() for v in values if isinstance(v, str) and is_plain_address(v.strip()))
    return found or None


def stats(queue: SpoolQueue, now: float) -> QueueStats:
    """The counts from directory listings and the deferred index (which may be up to
    RESCAN_DEFERRED seconds behind other processes' changes). A new file's age is its
    mtime; only the OLDEST_PROBE smallest names are looked at (Fossil's and
    mailrelayd-sendmail's names start with the time they were written). With keep_sent,
    sent_24h stats every kept file."""
    state = queue.state
    new = state.names(SPOOL)
    times = [st.st_mtime for name in heapq.nsmallest(OLDEST_PROBE, new) if (st := state.lstat(SPOOL, name))]
    deferred = queue.deferred_times(now)
    later = [t for t, _ in deferred if t > now]
    times += [first_seen for _, first_seen in deferred]
    sent = None
    if queue.keep_sent:
        sent = sum(1 for n in state.names("sent") if (st := state.lstat("sent", n)) and st.st_mtime >= now - 86400)
    oldest = min(times, default=None)
    return QueueStats(queued=len(new) + len(deferred) - len(later), deferred=len(later),
                      failed=_set_aside(state, "failed"), sent_24h=sent,
                      oldest_queued_s=None if oldest is None else max(0.0, now - oldest),
                      next_try=min(later, default=None), refused=_set_aside(state, "corrupt"))


def _set_aside(state, where: str) -> int:
    """Entries in failed/ or corrupt/, not counting their .reason files."""
    names = set(state.names(where))
    return sum(1 for n in names if not (n.endswith(".reason") and n[:-7] in names))
