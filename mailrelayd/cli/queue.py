"""`mailrelayd status|list|show|retry|purge`: look after a queue, like postqueue/postsuper.

Each command parses its own flags and the queue's, asks the queue (through the Queue
interface), and formats the answer; one line per message. Ids are those of the logs.
`retry` and `purge` tell a daemon relaying the queue at once (SIGUSR1, as `postqueue -f`
tells Postfix), so it does not wait for its next scan.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from mailrelayd.attempt import envelope_of
from mailrelayd.cli.options import QUEUE_KEYS, Parser, add_config_options, become_user, fail, parse_and_load
from mailrelayd.compose import make_queue
from mailrelayd.config import Config, expand, glob_problem, is_glob, parse_duration
from mailrelayd.message import MalformedMessage, header_block
from mailrelayd.queuelock import holder_note, holder_pid
from mailrelayd.queues import Entry, Queue, QueueError
from mailrelayd.terminal import age, clean, one_line, when

COMMANDS = ("status", "list", "show", "retry", "purge")
READ_ONLY = ("status", "list", "show")  # may run as root; retry and purge follow the relay's rule (privileges.py)
EPILOG = ("Exit status: 0 done, 1 no such message, 64 bad command line, 66 queue unreadable, 78 bad"
          " configuration (or retry and purge run as root without --user or --allow-root).")
USAGE = {
    "status": "mailrelayd status [--json] [QUEUE OPTIONS]",
    "list": "mailrelayd list [--deferred | --failed | --refused] [--json] [QUEUE OPTIONS]",
    "show": "mailrelayd show ID [QUEUE OPTIONS]",
    "retry": "mailrelayd retry [--failed] (ID... | --all) [QUEUE OPTIONS]",
    "purge": "mailrelayd purge (--failed [ID...] | --refused | --sentlog) [--older-than D] [QUEUE OPTIONS]",
}
HELP = {
    "status": "Count the queue's messages: queued, deferred, failed, sent in 24 h, and the oldest one's age.",
    "list": "One line per message still to send (or --deferred, --failed, --refused): id, age, size, envelope"
            " sender, recipients, attempts, last error.",
    "show": "Print a message's header (never its body) and its delivery history.",
    "retry": "Make deferred messages due now, or with --failed put failed messages back in the queue.",
    "purge": "Delete failed messages (--failed [ID...] [--older-than D]), refused spool entries (--refused"
             " [--older-than D]) or sent-log entries (--sentlog --older-than D).",
}


def parser(command: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"mailrelayd {command}", usage=USAGE[command], description=HELP[command], epilog=EPILOG)
    if command in ("status", "list"):
        p.add_argument("--json", action="store_true", help="JSON instead of a table" +
                       (" (one object per line, as postqueue -j)" if command == "list" else ""))
    if command == "list":
        which = p.add_mutually_exclusive_group()
        which.add_argument("--deferred", action="store_true", help="only messages waiting for a later try")
        which.add_argument("--failed", action="store_true", help="messages set aside, with the reason")
        which.add_argument("--refused", action="store_true", help="spool entries refused unread, with the reason")
    elif command == "show":
        p.add_argument("id", metavar="ID", help="a message id, as `list` prints it")
    elif command == "retry":
        p.add_argument("ids", metavar="ID", nargs="*", help="message ids, as `list` prints them")
        p.add_argument("--all", action="store_true", help="every deferred (or, with --failed, failed) message")
        p.add_argument("--failed", action="store_true", help="put failed messages back in the queue")
    elif command == "purge":
        p.add_argument("ids", metavar="ID", nargs="*", help="with --failed: only these failed messages")
        what = p.add_mutually_exclusive_group()
        what.add_argument("--failed", action="store_true", help="delete failed messages")
        what.add_argument("--refused", action="store_true", help="delete refused spool entries (corrupt/)")
        what.add_argument("--sentlog", action="store_true", help="delete sentlog rows (or kept sent files)")
        p.add_argument("--older-than", type=_duration, metavar="DURATION",
                       help="only what is older than this (30d, 12h)")
    shown = ("envelope_from",) if command in ("list", "show") else ()  # the sender they print is the one used
    add_config_options(p, QUEUE_KEYS + shown + (() if command in READ_ONLY else ("allow_root",)))
    return p


def main(command: str, argv: list[str]) -> int:
    loaded = parse_and_load(parser(command), argv)
    if isinstance(loaded, int):
        return loaded
    args, config = loaded
    refused = become_user(config, read_only=command in READ_ONLY)
    if refused is not None:
        return refused
    now = time.time()
    if config.queues or is_glob(config.queue_path):
        if command == "status":
            return _status_all(expand(config), args, now, [p for q in config.queue_configs if (p := glob_problem(q))])
        return fail(f"{command} works on one queue: name it with --db or --spool", os.EX_USAGE)
    queue = make_queue(config)
    try:
        queue.open(read_only=command in READ_ONLY)
        return _COMMANDS[command](queue, args, now, config)
    except QueueError as e:
        return fail(clean(str(e)), os.EX_NOINPUT)
    finally:
        queue.close()


# -- status --------------------------------------------------------------------------------


def status(queue: Queue, args, now: float, config: Config) -> int:
    report = _report(queue, now, config)
    if args.json:
        print(json.dumps(report))
    else:
        _print_status(report, now)
    return 0


def _status_all(queues: list[Config], args, now: float, unlisted: list[str]) -> int:
    """`status` of several queues ([[queue]] tables, or a glob): each queue's report under
    `queues`, and the totals. Exit 66 if any queue, or a glob's directory (`unlisted`, the
    problems), could not be read (the others are shown)."""
    reports, unreadable = [], bool(unlisted)
    for problem in unlisted:
        fail(clean(problem), os.EX_NOINPUT)
    for config in queues:
        queue = make_queue(config)
        try:
            queue.open(read_only=True)
            reports.append(_report(queue, now, config))
        except QueueError as e:
            fail(clean(str(e)), os.EX_NOINPUT)
            unreadable = True
        finally:
            queue.close()
    sent = [r["sent_24h"] for r in reports if r["sent_24h"] is not None]
    pids = {r["relay_pid"] for r in reports}
    totals = {
        **{key: sum(r[key] for r in reports) for key in ("queued", "deferred", "failed", "refused")},
        "sent_24h": sum(sent) if sent else None,
        "oldest_queued_s": max((r["oldest_queued_s"] for r in reports if r["oldest_queued_s"] is not None),
                               default=None),
        "next_try": min((r["next_try"] for r in reports if r["next_try"] is not None), default=None),
        # one process relaying every queue (as one daemon with [[queue]] tables does): its pid
        "relay_pid": pids.pop() if len(pids) == 1 else None,
        "concurrency": sum(c) if (c := [r["concurrency"] for r in reports if r["concurrency"] is not None]) else None,
        "queues": reports,
    }
    if args.json:
        print(json.dumps(totals))
    else:
        for report in reports:
            _print_status(report, now)
            print()
        _print_status({**totals, "queue": f"total of {len(reports)} queues"}, now)
    return os.EX_NOINPUT if unreadable else 0


def _report(queue: Queue, now: float, config: Config) -> dict:
    stats = queue.stats(now)
    rate = config.rate_limit
    used = None
    if rate is not None and queue.sent_record is not None:
        used = len(queue.sent_times(now - rate.period, rate.count))
    return {
        "queue": os.path.abspath(queue.name),
        "queued": stats.queued,
        "deferred": stats.deferred,
        "failed": stats.failed,
        "refused": stats.refused,
        "sent_24h": stats.sent_24h,
        "oldest_queued_s": None if stats.oldest_queued_s is None else round(stats.oldest_queued_s, 1),
        "relay_pid": holder_pid(queue.lock_path),
        "next_try": stats.next_try,
        "rate_limit": None if rate is None else str(rate),
        "rate_used": used,
        "concurrency": _concurrency(queue),
    }


def _concurrency(queue: Queue) -> int | None:
    """The deliveries the daemon relaying `queue` lets run at once now (from its lock file)."""
    note = holder_note(queue.lock_path) or ""
    word, _, number = note.partition(" ")
    return int(number) if word == "concurrency" and number.isdigit() else None


def _print_status(report: dict, now: float) -> None:
    next_try = report["next_try"]
    rows = [
        ("queue", clean(report["queue"])),
        ("queued", str(report["queued"])),
        ("deferred", f"{report['deferred']}" + (f" (next try {when(next_try)}, in {age(next_try - now)})"
                                                 if next_try is not None else "")),
        ("failed", str(report["failed"])),
        ("refused", str(report["refused"])),
        ("sent_24h", "not kept (keep_sent is off)" if report["sent_24h"] is None else str(report["sent_24h"])),
        ("oldest_queued", age(report["oldest_queued_s"])),
        ("relay_pid", "none" if report["relay_pid"] is None else str(report["relay_pid"])),
    ]
    if report.get("concurrency") is not None:
        rows.append(("concurrency", str(report["concurrency"])))
    if "rate_limit" in report:
        used = report["rate_used"]
        rows.append(("rate_limit", "none" if report["rate_limit"] is None else report["rate_limit"]
                     + ("" if used is None else f" ({used} sent in the last period)")))
    for key, value in rows:
        print(f"{key:<14} {value}")


# -- list and show -------------------------------------------------------------------------


def list_(queue: Queue, args, now: float, config: Config) -> int:
    states = ({"failed"} if args.failed else {"refused"} if args.refused else {"deferred"} if args.deferred
              else {"new", "deferred"})
    entries = queue.entries(states, now)
    if args.json:
        for e in entries:
            print(json.dumps(_as_json(e, config)))
        return 0
    print("ID  AGE  SIZE  SENDER  RECIPIENTS  ATTEMPTS  " + ("REASON" if states & {"failed", "refused"}
                                                             else "LAST ERROR"))
    for e in entries:
        sender, recipients = _envelope(e, config)
        last = e.reason if e.state in ("failed", "refused") else e.last_error
        print(clean(f"{e.id}  {age(now - e.first_seen if e.first_seen else None)}  {e.size}  {_sender(sender)}"
                    f"  {','.join(recipients) or '-'}  attempts={e.attempts}  {one_line(last)}"))
    print(f"-- {len(entries)} message{'s' if len(entries) != 1 else ''}")
    return 0


def show(queue: Queue, args, now: float, config: Config) -> int:
    e = queue.find(args.id, now)
    if e is None:
        return fail(f"no message {clean(args.id)} in {clean(queue.name)}", 1)
    sender, recipients = _envelope(e, config)
    # the header's line breaks and tabs as they are; a lone CR, ESC or a byte that is not UTF-8 escaped
    print(clean(header_block(e.data).decode("utf-8", "surrogateescape").replace("\r\n", "\n"), keep="\n\t"))
    print()
    history = [
        ("id", e.id), ("state", e.state), ("size", str(e.size)),
        ("envelope_from", _sender(sender, long=True)), ("recipients", ", ".join(recipients) or "-"),
        ("attempts", str(e.attempts)), ("first_seen", when(e.first_seen)), ("last_try", when(e.last_try)),
    ]
    if e.state in ("failed", "refused"):
        history += [("failed_at", when(e.failed_at)), ("reason", one_line(e.reason, 1000))]
    else:
        history += [("next_try", when(e.next_try) if e.next_try and e.next_try > now else "now")]
    history += [("last_error", one_line(e.last_error, 1000))]
    for key, value in history:
        print(clean(f"{key + ':':<15}{value}"))
    return 0


def _envelope(e: Entry, config: Config) -> tuple[str | None, tuple[str, ...]]:
    """(sender, recipients) that a delivery of `e` goes with under `config`, as the relay
    works them out (mailrelayd.attempt.envelope_of, then smtp_from over SMTP): the sender
    "" is the null sender, None none passed on (sendmail's own default then). A message
    that cannot be read as one: what was recorded with it."""
    recorded = (e.sender or "", e.recipients) if e.recipients else None
    try:
        envelope = envelope_of(e.data, recorded, envelope_from=config.envelope_from)
    except MalformedMessage:
        return e.sender or None, e.recipients or ()
    if config.smtp.server:  # MAIL FROM: smtp_from, else the sender, else the null sender
        return config.smtp.envelope_from or envelope.sender or "", envelope.recipients
    return envelope.sender, envelope.recipients


def _sender(sender: str | None, long: bool = False) -> str:
    if sender is None:
        return "none passed on (no -f: sendmail's own default)" if long else "-"
    return sender or "<>"


def _as_json(e: Entry, config: Config) -> dict:
    """One message as `list --json` prints it (compare postqueue -j)."""
    sender, recipients = _envelope(e, config)
    return {"id": e.id, "state": e.state, "size": e.size, "sender": sender, "recipients": list(recipients),
            "attempts": e.attempts, "first_seen": e.first_seen, "last_try": e.last_try, "next_try": e.next_try,
            "last_error": e.last_error, "reason": e.reason, "failed_at": e.failed_at}


# -- retry and purge -----------------------------------------------------------------------


def retry(queue: Queue, args, now: float, config: Config) -> int:
    if args.all == bool(args.ids):
        return fail("retry needs message ids or --all" if not args.all else "give message ids or --all, not both",
                    os.EX_USAGE)
    ids = None if args.all else args.ids
    if args.failed:
        moved = queue.requeue(ids, now)
        for old, new in moved:
            print(clean(f"{old}: back in the queue as {new}"))
        done = [old for old, _ in moved]
    else:
        done = queue.make_due(ids, now)
        for ident in done:
            print(clean(f"{ident}: due now"))
    missing = []
    for ident in (i for i in ids or [] if i not in done and i.upper() not in done):
        found = None if args.failed else queue.find(ident, now)
        if found is not None and found.state == "new":  # what retry asks for is so already
            print(clean(f"{ident}: already due"))
            done.append(ident)
        else:
            missing.append(ident)
            fail(f"no {'failed' if args.failed else 'deferred'} message {clean(ident)}", 1)
    if not done and args.all:
        print("nothing to retry")
    if done:
        _tell_daemon(queue)
    return 1 if missing else 0


def purge(queue: Queue, args, now: float, config: Config) -> int:
    if not (args.failed or args.refused or args.sentlog):
        return fail("purge needs --failed, --refused or --sentlog", os.EX_USAGE)
    if args.ids and not args.failed:
        return fail("message ids are only for purge --failed", os.EX_USAGE)
    if args.ids and args.older_than is not None:
        return fail("give failed message ids or --older-than, not both", os.EX_USAGE)
    if args.sentlog and args.older_than is None:
        return fail("purge --sentlog needs --older-than DURATION", os.EX_USAGE)
    before = now - (args.older_than or 0.0)
    if args.failed:
        done, what = queue.purge_failed(args.ids or None, before), "failed messages"
    elif args.refused:
        done, what = queue.purge_refused(before), "refused entries"
    elif queue.sent_record is None:
        print("no sent messages are kept (keep_sent is off): nothing to purge")
        return 0
    else:
        done, what = queue.purge_sent(before), queue.sent_record
    print(clean(f"deleted {len(done)} {what}" + (": " + " ".join(done) if done else "")))
    missing = [i for i in args.ids if i not in done and i.upper() not in done]
    for ident in missing:
        fail(f"no failed message {clean(ident)}", 1)
    if done and args.failed:
        _tell_daemon(queue)
    return 1 if missing else 0


def _tell_daemon(queue: Queue) -> None:
    """Wake the daemon relaying this queue (SIGUSR1), so that it acts on the change now."""
    pid = holder_pid(queue.lock_path)
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError:
        print(f"(the daemon, pid {pid}, may not be signalled by this user: it notices within a minute,"
              f" or run `kill -USR1 {pid}` as its user)", file=sys.stderr)
    except ProcessLookupError:
        pass


# -- formatting ----------------------------------------------------------------------------


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_COMMANDS = {"status": status, "list": list_, "show": show, "retry": retry, "purge": purge}
