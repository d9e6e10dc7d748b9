"""Admin commands: `mailrelayd status|list|show|retry|purge`, like postqueue/postsuper.

Each command opens the configured queue (the same flags and config file as the daemon),
reads or changes it, prints one line per message and exits. Writes to a SQLite queue are
single statements, as the relay's own (Fossil gives up after a second of lock); spool
files move by atomic rename and are never deleted except by `purge`.

Message ids are those of the logs: a SQLite queue's `emailid`, a spool file's name. A
SQLite message set aside has left the `email` table, so it is named `F<n>` after its
row in `mailrelayd_failed` (the emailid it had may be reused by a new message).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailrelayd.files import free_name, fsync_dir, write_durably
from mailrelayd.inject import split_envelope
from mailrelayd.message import MalformedMessage, header_block, read_envelope
from mailrelayd.queuelock import holder_pid
from mailrelayd.queues import QueueError
from mailrelayd.queues.spool import SpoolQueue
from mailrelayd.queues.sqlite import SqliteQueue, date_header

COMMANDS = ("status", "list", "show", "retry", "purge")
EX_NOINPUT, EX_USAGE, EX_CONFIG = 66, 64, 78


@dataclass
class Entry:
    """One message as the admin commands see it."""

    id: str
    state: str  # new, deferred or failed
    data: bytes
    attempts: int = 0
    first_seen: float | None = None  # when the relay first saw it, or the best guess
    last_try: float | None = None
    next_try: float | None = None
    last_error: str | None = None
    reason: str | None = None  # failed only
    failed_at: float | None = None
    recipients: tuple[str, ...] | None = None  # recorded: still to get it / never got it
    details: dict = field(default_factory=dict)

    def envelope(self) -> tuple[str, tuple[str, ...], bytes]:
        """(sender, recipients, message without any injector preamble)."""
        data, sender, recipients = self.data, "", ()
        try:
            split = split_envelope(data)
        except ValueError:
            split = None
        if split is not None:
            sender, recipients, data = split
        else:
            try:
                env = read_envelope(data)
                sender, recipients = env.sender or env.from_address, env.recipients
            except MalformedMessage:
                pass
        if self.recipients:
            recipients = self.recipients
        return sender or "<>", tuple(recipients), data


# -- the two queue kinds ---------------------------------------------------------------


class SqliteAdmin:
    def __init__(self, queue: SqliteQueue):
        self.queue = queue
        self.name = queue.name
        self.db: sqlite3.Connection = queue._db

    def entries(self, states: set[str], now: float) -> list[Entry]:
        found = []
        if states & {"new", "deferred"}:
            rows = self.db.execute(
                "SELECT e.emailid, CAST(e.msg AS BLOB), q.attempts, q.first_seen, q.last_try, q.next_try,"
                " q.last_error, q.recipients FROM email e LEFT JOIN mailrelayd_queue q ON q.emailid = e.emailid"
                " ORDER BY e.emailid").fetchall()
            # a row the relay has not seen yet has no first_seen: its Date:, else the file's last change
            file_mtime = self.queue.path.stat().st_mtime
            for emailid, data, attempts, first_seen, last_try, next_try, error, recipients in rows:
                data = data or b""
                state = "deferred" if next_try is not None and next_try > now else "new"
                if state not in states:
                    continue
                if first_seen is None:
                    first_seen = date_header(data, now) or file_mtime
                found.append(Entry(str(emailid), state, data, attempts or 0, first_seen, last_try, next_try, error,
                                   recipients=tuple(json.loads(recipients)) if recipients else None))
        if "failed" in states:
            for fid, emailid, data, reason, attempts, first_seen, failed_at, error, recipients in self.db.execute(
                    "SELECT id, emailid, CAST(msg AS BLOB), reason, attempts, first_seen, failed_at, last_error,"
                    " recipients FROM mailrelayd_failed ORDER BY id").fetchall():
                found.append(Entry(f"F{fid}", "failed", data or b"", attempts or 0, first_seen, None, None, error,
                                   reason, failed_at,
                                   tuple(json.loads(recipients)) if recipients else None,
                                   {"emailid": emailid}))
        return found

    def find(self, ident: str, now: float) -> Entry | None:
        wanted = "failed" if ident[:1] in ("F", "f") else None
        for entry in self.entries({wanted} if wanted else {"new", "deferred"}, now):
            if entry.id.lower() == ident.lower():
                return entry
        return None

    def make_due(self, ids: list[str] | None, now: float) -> list[str]:
        """Deferred messages (these, or all) due now: one UPDATE. Returns their ids."""
        where, params = "next_try > ? AND owner IS NULL", [now]
        if ids is not None:
            numbers = [int(i) for i in ids if i.isdigit()]
            if not numbers:
                return []
            where += f" AND emailid IN ({','.join('?' * len(numbers))})"
            params += numbers
        rows = self.db.execute(f"UPDATE mailrelayd_queue SET next_try = ? WHERE {where} RETURNING emailid",
                               [now, *params]).fetchall()
        return sorted(str(r[0]) for r in rows)

    def requeue(self, ids: list[str] | None, now: float) -> list[tuple[str, str]]:
        """Failed messages back into `email`, each moved in one statement (a temporary view's
        trigger inserts it and deletes the failed row together). Returns (F-id, new emailid)."""
        self.db.executescript(_REQUEUE_VIEW)
        if ids is None:
            fids = [r[0] for r in self.db.execute("SELECT id FROM mailrelayd_failed ORDER BY id").fetchall()]
        else:
            fids = [int(i.lstrip("Ff")) for i in ids if i.lstrip("Ff").isdigit()]
        done = []
        for fid in fids:
            self.db.execute("DELETE FROM temp.mailrelayd_requeued")
            self.db.execute("INSERT INTO mailrelayd_requeue SELECT id, ? FROM mailrelayd_failed WHERE id = ?",
                            (now, fid))
            for (emailid,) in self.db.execute("SELECT emailid FROM temp.mailrelayd_requeued").fetchall():
                done.append((f"F{fid}", str(emailid)))
        return done

    def purge_failed(self, before: float) -> list[str]:
        rows = self.db.execute("DELETE FROM mailrelayd_failed WHERE coalesce(failed_at, 0) < ? RETURNING id",
                               (before,)).fetchall()
        return [f"F{r[0]}" for r in sorted(rows)]

    def purge_sent(self, before: float) -> list[str]:
        rows = self.db.execute("DELETE FROM sentlog WHERE mtime < ? RETURNING rowid", (int(before),)).fetchall()
        return [str(r[0]) for r in sorted(rows)]


# Per connection: inserting (failed id, now) into mailrelayd_requeue puts that message back in
# `email` (as text, as Fossil writes it) and deletes its failed row, in one statement. After a
# partial send it also records who is still to get it, so nobody gets it twice.
_REQUEUE_VIEW = """
CREATE TEMP TABLE IF NOT EXISTS mailrelayd_requeued(emailid INTEGER);
CREATE TEMP VIEW IF NOT EXISTS mailrelayd_requeue(id, now) AS SELECT NULL, NULL WHERE 0;
CREATE TEMP TRIGGER IF NOT EXISTS mailrelayd_requeue_insert INSTEAD OF INSERT ON mailrelayd_requeue BEGIN
    INSERT INTO email(msg) SELECT CAST(msg AS TEXT) FROM mailrelayd_failed WHERE id = NEW.id;
    INSERT INTO mailrelayd_requeued(emailid) VALUES (last_insert_rowid());
    INSERT OR REPLACE INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, recipients)
        SELECT (SELECT emailid FROM mailrelayd_requeued), 0, NEW.now, NEW.now, recipients
        FROM mailrelayd_failed WHERE id = NEW.id AND recipients IS NOT NULL;
    DELETE FROM mailrelayd_failed WHERE id = NEW.id;
END;
"""


def _reason_file(path: Path) -> dict[str, str]:
    try:
        text = Path(f"{path}.reason").read_text(errors="replace")
    except OSError:
        return {}
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class SpoolAdmin:
    def __init__(self, queue: SpoolQueue):
        self.queue = queue
        self.name = queue.name

    def _names(self, directory: Path) -> list[str]:
        return sorted(n for n in os.listdir(directory) if not n.startswith("."))

    def _read(self, path: Path) -> bytes | None:
        """The file's bytes, read as the relay would: never through a link, never a FIFO."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > self.queue.max_size:
                return b""
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def entries(self, states: set[str], now: float) -> list[Entry]:
        q, found = self.queue, []
        if "new" in states or "deferred" in states:
            for name in self._names(q.dir("deferred")):
                path = q.dir("deferred") / name
                s = q._read_state(path)
                next_try = _float(s.get("next_try"))
                state = "deferred" if next_try is not None and next_try > now else "new"
                if state not in states or (data := self._read(path)) is None:
                    continue
                first_seen = _float(s.get("first_seen")) or os.lstat(path).st_mtime
                found.append(Entry(name, state, data, int(s.get("attempts", 0)), first_seen,
                                   _float(s.get("last_try")), next_try, s.get("last_error"),
                                   recipients=tuple(s["recipients"]) if s.get("recipients") else None))
        if "new" in states:
            for name in self._names(q.spool):
                path = q.spool / name
                if (data := self._read(path)) is None:
                    continue
                found.append(Entry(name, "new", data, 0, os.lstat(path).st_mtime))
        if "failed" in states:
            failed = q.dir("failed")
            names = set(self._names(failed))
            for name in sorted(names):
                if name.endswith(".reason") and name[:-7] in names:
                    continue
                path = failed / name
                if (data := self._read(path)) is None:
                    continue
                r = _reason_file(path)
                recipients = tuple(a.strip() for a in r["recipients"].split(",") if a.strip()) \
                    if r.get("recipients") else None
                failed_at = _float(r.get("failed_at")) or os.lstat(path).st_mtime
                found.append(Entry(name, "failed", data, int(_float(r.get("attempts")) or 0),
                                   _float(r.get("first_seen")), None, None, None, r.get("reason", "?"),
                                   failed_at, recipients))
        return found

    def find(self, ident: str, now: float) -> Entry | None:
        if "/" in ident or ident.startswith("."):
            return None
        for entry in self.entries({"new", "deferred", "failed"}, now):
            if entry.id == ident:
                return entry
        return None

    def make_due(self, ids: list[str] | None, now: float) -> list[str]:
        """Rewrite each deferred message's schedule with next_try = now (atomically)."""
        q, done = self.queue, []
        for entry in self.entries({"deferred"}, now):
            if ids is not None and entry.id not in ids:
                continue
            path = q.dir("deferred") / entry.id
            state = q._read_state(path)
            if not state or not os.path.lexists(path):
                continue
            state["next_try"] = now
            write_durably(q._schedule(path), json.dumps(state).encode(), q.dir("tmp"))
            done.append(entry.id)
        return done

    def requeue(self, ids: list[str] | None, now: float) -> list[tuple[str, str]]:
        """Each failed message back into the spool by rename, then its .reason removed.

        One that reached some recipients (a partial send) goes to deferred/ instead, with a
        schedule naming only those still to get it (written first, so a crash leaves the
        message in failed/ and at worst an orphan schedule that the relay prunes).
        """
        q, done = self.queue, []
        for entry in self.entries({"failed"}, now):
            if ids is not None and entry.id not in ids:
                continue
            src = q.dir("failed") / entry.id
            if entry.recipients:
                target = free_name(q.dir("deferred"), entry.id)
                state = {"attempts": 0, "first_seen": entry.first_seen or now, "next_try": now, "last_try": None,
                         "last_error": entry.reason, "recipients": list(entry.recipients)}
                write_durably(q._schedule(target), json.dumps(state).encode(), q.dir("tmp"))
            else:
                target = free_name(q.spool, entry.id)
            os.rename(src, target)
            fsync_dir(target.parent)
            fsync_dir(src.parent)
            Path(f"{src}.reason").unlink(missing_ok=True)
            done.append((entry.id, target.name))
        return done

    def purge_failed(self, before: float) -> list[str]:
        q, done = self.queue, []
        for entry in self.entries({"failed"}, time.time()):
            if (entry.failed_at or 0) < before:
                path = q.dir("failed") / entry.id
                path.unlink(missing_ok=True)
                Path(f"{path}.reason").unlink(missing_ok=True)
                done.append(entry.id)
        if done:
            fsync_dir(q.dir("failed"))
        return done

    def purge_sent(self, before: float) -> list[str]:
        sent, done = self.queue.dir("sent"), []
        for name in sorted(os.listdir(sent)):
            if os.lstat(sent / name).st_mtime < before:
                os.unlink(sent / name)
                done.append(name)
        return done


# -- output helpers --------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _one_line(text: str | None, limit: int = 200) -> str:
    if not text:
        return "-"
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the commands ----------------------------------------------------------------------


def status(admin, args, now: float) -> int:
    report = _status_report(admin.queue, now)
    if args.json:
        print(json.dumps(report))
    else:
        _print_status(report, now)
    return 0


def status_all(queues: list, args, now: float) -> int:
    """`status` of several queues ([[queue]] tables, or a glob): each queue's report under
    `queues`, and the totals. Exit 66 if any queue could not be read (the others are shown)."""
    from mailrelayd.cli import make_queue

    reports, unreadable = [], False
    for config in queues:
        queue = make_queue(config)
        try:
            queue.open()
            reports.append(_status_report(queue, now))
        except (QueueError, sqlite3.Error, OSError) as e:
            print(f"mailrelayd: {_error_text(e, queue.name)}", file=sys.stderr)
            unreadable = True
        finally:
            queue.close()
    sent = [r["sent_24h"] for r in reports if r["sent_24h"] is not None]
    totals = {
        **{key: sum(r[key] for r in reports) for key in ("queued", "deferred", "failed")},
        "sent_24h": sum(sent) if sent else None,
        "oldest_queued_s": max((r["oldest_queued_s"] for r in reports if r["oldest_queued_s"] is not None),
                               default=None),
        "next_try": min((r["next_try"] for r in reports if r["next_try"] is not None), default=None),
        # one process relaying every queue (as one daemon with [[queue]] tables does): its pid
        "relay_pid": pids.pop() if len(pids := {r["relay_pid"] for r in reports}) == 1 else None,
        "queues": reports,
    }
    if args.json:
        print(json.dumps(totals))
    else:
        for report in reports:
            _print_status(report, now)
            print()
        _print_status({"queue": f"total of {len(reports)} queues", **totals}, now)
    return EX_NOINPUT if unreadable else 0


def _status_report(queue, now: float) -> dict:
    stats = queue.stats(now)
    return {
        "queue": os.path.abspath(queue.name),
        "queued": stats.queued,
        "deferred": stats.deferred,
        "failed": stats.failed,
        "sent_24h": stats.sent_24h,
        "oldest_queued_s": None if stats.oldest_queued_s is None else round(stats.oldest_queued_s, 1),
        "relay_pid": holder_pid(queue.lock_path),
        "next_try": stats.next_try,
    }


def _print_status(report: dict, now: float) -> None:
    next_try = report["next_try"]
    rows = [
        ("queue", report["queue"]),
        ("queued", str(report["queued"])),
        ("deferred", f"{report['deferred']}" + (f" (next try {_when(next_try)}, in {_age(next_try - now)})"
                                                 if next_try is not None else "")),
        ("failed", str(report["failed"])),
        ("sent_24h", "not kept (keep_sent is off)" if report["sent_24h"] is None else str(report["sent_24h"])),
        ("oldest_queued", _age(report["oldest_queued_s"])),
    ]
    if "relay_pid" in report:
        rows.append(("relay_pid", "none" if report["relay_pid"] is None else str(report["relay_pid"])))
    for key, value in rows:
        print(f"{key:<14} {value}")


def list_(admin, args, now: float) -> int:
    states = {"failed"} if args.failed else {"deferred"} if args.deferred else {"new", "deferred"}
    entries = admin.entries(states, now)
    for e in entries:
        sender, recipients, _ = e.envelope()
        last = e.reason if e.state == "failed" else e.last_error
        print(f"{e.id}  {_age(now - e.first_seen if e.first_seen else None)}  {len(e.data)}  {sender}"
              f"  {','.join(recipients) or '-'}  attempts={e.attempts}  {_one_line(last)}")
    print(f"-- {len(entries)} message{'s' if len(entries) != 1 else ''}")
    return 0


def show(admin, args, now: float) -> int:
    e = admin.find(args.id, now)
    if e is None:
        print(f"mailrelayd: no message {args.id} in {admin.name}", file=sys.stderr)
        return 1
    sender, recipients, message = e.envelope()
    print(header_block(message).decode("utf-8", "replace").replace("\r\n", "\n"))
    print()
    history = [
        ("id", e.id), ("state", e.state), ("size", str(len(e.data))),
        ("envelope_from", sender), ("recipients", ", ".join(recipients) or "-"),
        ("attempts", str(e.attempts)), ("first_seen", _when(e.first_seen)), ("last_try", _when(e.last_try)),
    ]
    if e.state == "failed":
        history += [("failed_at", _when(e.failed_at)), ("reason", _one_line(e.reason, 1000))]
    else:
        history += [("next_try", _when(e.next_try) if e.next_try and e.next_try > now else "now")]
    history += [("last_error", _one_line(e.last_error, 1000))]
    for key, value in history:
        print(f"{key + ':':<15}{value}")
    return 0


def retry(admin, args, now: float) -> int:
    if not args.all and not args.ids:
        print("mailrelayd: retry needs message ids or --all", file=sys.stderr)
        return EX_USAGE
    if args.all and args.ids:
        print("mailrelayd: give message ids or --all, not both", file=sys.stderr)
        return EX_USAGE
    ids = None if args.all else args.ids
    if args.failed:
        done = admin.requeue(ids, now)
        for old, new in done:
            print(f"{old}: back in the queue as {new}")
        handled = {old.lower() for old, _ in done}
        handled |= {old.lower().lstrip("f") for old, _ in done}
    else:
        done = admin.make_due(ids, now)
        for ident in done:
            print(f"{ident}: due now")
        handled = set(done)
    missing = [i for i in (ids or []) if i.lower() not in handled and i not in handled]
    for ident in missing:
        print(f"mailrelayd: no {'failed' if args.failed else 'deferred'} message {ident}", file=sys.stderr)
    if not done and args.all:
        print("nothing to retry")
    return 1 if missing else 0


def purge(admin, args, now: float) -> int:
    if args.failed == args.sentlog:
        print("mailrelayd: purge needs --failed or --sentlog", file=sys.stderr)
        return EX_USAGE
    if args.sentlog and args.older_than is None:
        print("mailrelayd: purge --sentlog needs --older-than DURATION", file=sys.stderr)
        return EX_USAGE
    before = now - (args.older_than or 0.0)
    if args.sentlog:
        if isinstance(admin, SpoolAdmin) and not admin.queue.keep_sent:
            print("no sent messages are kept (keep_sent is off): nothing to purge")
            return 0
        done, what = admin.purge_sent(before), "sent log entries" if isinstance(admin, SqliteAdmin) else "sent messages"
    else:
        done, what = admin.purge_failed(before), "failed messages"
    print(f"deleted {len(done)} {what}" + (": " + " ".join(done) if done else ""))
    return 0


# -- entry point -----------------------------------------------------------------------


def _add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    from mailrelayd.config import _duration

    if command == "status":
        parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    elif command == "list":
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--failed", action="store_true", help="messages set aside, with the reason")
        which.add_argument("--deferred", action="store_true", help="only messages waiting for a later try")
    elif command == "show":
        parser.add_argument("id", metavar="ID", help="a message id, as `list` prints it")
    elif command == "retry":
        parser.add_argument("ids", metavar="ID", nargs="*", help="message ids, as `list` prints them")
        parser.add_argument("--all", action="store_true", help="every deferred (or, with --failed, failed) message")
        parser.add_argument("--failed", action="store_true", help="put failed messages back in the queue")
    elif command == "purge":
        parser.add_argument("--failed", action="store_true", help="delete failed messages")
        parser.add_argument("--sentlog", action="store_true", help="delete sentlog rows (or kept sent files)")

        def duration(value: str) -> float:
            try:
                return _duration(0)(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        parser.add_argument("--older-than", type=duration, metavar="DURATION",
                            help="only what is older than this (30d, 12h)")


def main(command: str, argv: list[str]) -> int:
    from mailrelayd import admin_setup
    from mailrelayd.cli import command_config, make_queue
    from mailrelayd.config import expand, is_glob

    if command in admin_setup.COMMANDS:  # check-config, test-message
        return admin_setup.main(command, argv)
    # Output piped into `head` and closed: end quietly, as Unix tools do (each retry or
    # purge step is complete in itself, so stopping between two is safe).
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    loaded = command_config(command, argv, _HELP[command], "Exit status: 0 done, 1 no such message, 64 bad"
                            " command line, 66 queue unreadable, 78 bad configuration.", _add_arguments)
    if isinstance(loaded, int):
        return loaded
    args, config = loaded
    if config.queues or is_glob(config.queue_path):
        if command == "status":
            return status_all(expand(config), args, time.time())
        print(f"mailrelayd: {command} works on one queue: name it with --db or --spool", file=sys.stderr)
        return EX_USAGE
    queue = make_queue(config)
    try:
        queue.open()
        admin = SpoolAdmin(queue) if isinstance(queue, SpoolQueue) else SqliteAdmin(queue)
        return _COMMANDS[command](admin, args, time.time())
    except (QueueError, sqlite3.Error, OSError) as e:
        print(f"mailrelayd: {_error_text(e, queue.name)}", file=sys.stderr)
        return EX_NOINPUT
    finally:
        queue.close()


def _error_text(e: Exception, name: str) -> str:
    if isinstance(e, QueueError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.filename or name}: {e.strerror or e}"
    return f"{name}: {e}"


_COMMANDS = {"status": status, "list": list_, "show": show, "retry": retry, "purge": purge}
_HELP = {
    "status": "Count the queue's messages: queued, deferred, failed, sent in 24 h, and the oldest one's age.",
    "list": "One line per message still to send (or --deferred, or --failed): id, age, size, envelope sender,"
            " recipients, attempts, last error.",
    "show": "Print a message's header (never its body) and its delivery history.",
    "retry": "Make deferred messages due now, or with --failed put failed messages back in the queue.",
    "purge": "Delete failed messages (--failed [--older-than D]) or sent-log entries (--sentlog --older-than D).",
}
