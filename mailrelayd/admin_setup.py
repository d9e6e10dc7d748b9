"""Admin commands for setting up: `mailrelayd check-config` and `mailrelayd test-message`.

check-config only reads: it never creates, opens for writing or changes a file (not
even the SQLite queue, whose header it reads as bytes). test-message queues one message
as Fossil would (a row in `email`, or a spool file written atomically like the
injector's) and, with --now, runs one drain pass through the configured transport.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import quopri
import shutil
import socket
import sqlite3
import sys
import time
from dataclasses import fields, replace
from email.header import Header
from pathlib import Path

from mailrelayd.admin import EX_CONFIG, EX_NOINPUT, EX_USAGE, SpoolAdmin, SqliteAdmin, _one_line, _when
from mailrelayd.config import PROCESS_KEYS, Config, ConfigError, expand, is_glob
from mailrelayd.inject import enqueue, is_plain_address
from mailrelayd.queues.sqlite import SqliteQueue

COMMANDS = ("check-config", "test-message")
DEFAULT_SUBJECT = "Test message from mailrelayd"
DEFAULT_BODY = ("This is a test message queued by `mailrelayd test-message`.\n"
                "If you can read it, the relay delivers this queue's mail.\n")
SQLITE_MAGIC = b"SQLite format 3\x00"


# -- check-config ----------------------------------------------------------------------


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return "[" + ", ".join(_toml(v) for v in items) + "]"
    return json.dumps(str(value))  # a TOML basic string


def _state_dir(config: Config) -> Path | None:
    if not config.spool:
        return None
    spool = config.spool.absolute()
    return (config.state_dir or spool.with_name(spool.name + ".mailrelayd")).absolute()


def effective_lines(config: Config, base: Config | None = None) -> list[str]:
    """Every key = value, TOML-like; unset keys commented; the password file by path only.
    With `base` (the top level, for a [[queue]] table): only what differs from it."""
    lines = []
    for f in fields(Config):
        if f.name == "queues" or f.name in PROCESS_KEYS and base is not None:
            continue
        value = getattr(config, f.name)
        if base is not None and (value is None or value == getattr(base, f.name) and f.name not in ("db", "spool")):
            continue
        if f.name == "state_dir" and config.spool:
            value = _state_dir(config)
        if value is None:
            lines.append(f"# {f.name} = (not set)")
        elif f.name == "smtp_password_file":
            readable = os.path.isfile(value) and os.access(value, os.R_OK)
            lines.append(f"{f.name} = {_toml(value)}  # {'readable' if readable else 'NOT readable'},"
                         " content not shown")
        else:
            lines.append(f"{f.name} = {_toml(value)}")
    return lines


def _writable_dir(path: Path, what: str) -> str | None:
    """None if `path` is a directory this user can list and create files in, else the problem."""
    if not path.exists():
        return f"{what} {path}: no such directory"
    if not path.is_dir():
        return f"{what} {path}: not a directory"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return f"{what} {path}: not writable by this user"
    return None


def _command_problem(program: str) -> str | None:
    found = shutil.which(program) if "/" not in program else program
    if found is None or not os.path.exists(found):
        return f"command {program}: no such file" + ("" if "/" in program else " in PATH")
    if not os.path.isfile(found):
        return f"command {found}: not a file"
    if not os.access(found, os.X_OK):
        return f"command {found}: not executable by this user"
    return None


def transport_problems(config: Config) -> list[str]:
    from mailrelayd.cli import make_transport

    if config.maildir:
        maildir = config.maildir.absolute()
        if maildir.exists():
            problem = _writable_dir(maildir, "maildir")
        else:
            problem = _writable_dir(maildir.parent, "maildir's parent")
        return [problem] if problem else []
    if not config.smtp_server:
        problem = _command_problem(config.command[0])
        return [problem] if problem else []
    problems = []
    for key in ("smtp_password_file", "smtp_ca_file"):
        path = getattr(config, key)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            problems.append(f"{key} {path}: " + ("not readable by this user" if path.exists() else "no such file"))
    if not problems:
        try:
            make_transport(config)  # the SMTP settings' own checks; reads the password, prints nothing
        except ConfigError as e:
            problems.append(str(e))
    return problems


def queue_problems(config: Config) -> list[str]:
    if config.db:
        db = config.db.absolute()
        problem = _writable_dir(db.parent, "queue directory")  # SQLite writes its journal beside the file
        if problem:
            return [problem] + ([] if db.parent.exists() else [f"queue {db}: no such file"])
        if not db.exists():
            return [f"queue {db}: no such file"]
        if not db.is_file():
            return [f"queue {db}: not a file"]
        if not os.access(db, os.R_OK | os.W_OK):
            return [f"queue {db}: not readable and writable by this user"]
        try:
            with open(db, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            return [f"queue {db}: cannot read: {e.strerror}"]
        if head and head != SQLITE_MAGIC:
            return [f"queue {db}: not a SQLite database"]
        return []
    spool, state = config.spool.absolute(), _state_dir(config)
    problem = _writable_dir(spool, "spool")
    if problem:
        return [problem]
    problems = []
    existing = state if state.exists() else state.parent
    problem = _writable_dir(existing, "state_dir" if existing == state else "state_dir's parent")
    if problem:
        problems.append(problem)
    elif existing.stat().st_dev != spool.stat().st_dev:
        problems.append(f"state_dir {state}: not on the same file system as the spool {spool}"
                        " (moves would not be atomic)")
    return problems


def check_config(config: Config, args) -> int:
    for line in effective_lines(config):
        print(line)
    problems = []
    for table in config.queues:
        print("\n[[queue]]")
        for line in effective_lines(table, base=config):
            print(line)
        if is_glob(table.queue_path):
            matches = [q.queue_path for q in expand(replace(config, queues=(table,)))]
            print(f"# matches now: {', '.join(map(str, matches)) or 'nothing (picked up when it appears)'}")
    for queue in expand(config):
        problems += [p for p in transport_problems(queue) + queue_problems(queue) if p not in problems]
    for problem in problems:
        print(f"mailrelayd: {problem}", file=sys.stderr)
    if problems:
        print(f"# {len(problems)} problem{'s' if len(problems) != 1 else ''} (on stderr)")
        return EX_CONFIG
    print("# configuration OK")
    return 0


# -- test-message ----------------------------------------------------------------------


class _Usage(Exception):
    pass


def _header(name: str, value: str) -> bytes:
    if any(c in value for c in "\r\n") or not value.isprintable():
        raise _Usage(f"{name} must be one printable line")
    if not value.isascii():
        value = Header(value, "utf-8").encode()
    return f"{name}: {value}\r\n".encode()


def sender_address(config: Config) -> str:
    if config.envelope_from not in ("header", "none"):
        return config.envelope_from
    return "mailrelayd@" + socket.getfqdn()


def build_message(recipients: list[str], subject: str, body: str, sender: str) -> bytes:
    """A message shaped like Fossil's: CRLF lines, UTF-8 text, quoted-printable."""
    domain = sender.rpartition("@")[2] or socket.getfqdn()
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    encoded = quopri.encodestring(text.encode("utf-8")).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = (_header("To", ", ".join(recipients)) + _header("Subject", subject) + _header("From", sender)
            + _header("Date", email.utils.formatdate(localtime=True))
            + _header("Message-Id", email.utils.make_msgid(domain=domain))
            + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"UTF-8\"\r\n"
            + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")
    return head + encoded


def queue_message(config: Config, sender: str, recipients: list[str], message: bytes) -> str:
    """Queue it as Fossil (SQLite) or the injector (spool) would; return its id."""
    if config.db:
        if not config.db.exists():
            raise FileNotFoundError(2, "no such file", str(config.db))
        db = sqlite3.connect(config.db, timeout=1.0, isolation_level=None)
        try:
            return str(db.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (message,)).lastrowid)
        finally:
            db.close()
    return enqueue(str(config.spool), sender, recipients, message)


def _outcome(queue, ident: str) -> tuple[str, str]:
    """(state, details) of message `ident` after a drain pass."""
    now = time.time()
    if isinstance(queue, SqliteQueue):
        admin = SqliteAdmin(queue)
        entry = admin.find(ident, now)
        if entry is None:
            entry = next((e for e in admin.entries({"failed"}, now) if str(e.details.get("emailid")) == ident), None)
    else:
        entry = SpoolAdmin(queue).find(ident, now)
    if entry is None:
        return "sent", ""
    if entry.state == "failed":
        return "failed", f"set aside as {entry.id}: {_one_line(entry.reason)}"
    if entry.state == "deferred":
        return "deferred", f"next try {_when(entry.next_try)}: {_one_line(entry.last_error)}"
    return "not delivered", "still queued (not taken in this pass)"


def test_message(config: Config, args) -> int:
    from mailrelayd.cli import make_relay
    from mailrelayd.log import configure

    bad = [r for r in args.recipients if not is_plain_address(r) or "@" not in r]
    if bad:
        for r in bad:
            print(f"mailrelayd: not a plain address: {r!r}"[:200], file=sys.stderr)
        return EX_USAGE
    if args.body:
        try:
            body = Path(args.body).read_bytes().decode("utf-8")
        except OSError as e:
            print(f"mailrelayd: {args.body}: {e.strerror}", file=sys.stderr)
            return EX_NOINPUT
        except UnicodeDecodeError:
            print(f"mailrelayd: {args.body}: not UTF-8 text", file=sys.stderr)
            return EX_USAGE
    else:
        body = DEFAULT_BODY
    sender = sender_address(config)
    try:
        message = build_message(args.recipients, args.subject, body, sender)
    except _Usage as e:
        print(f"mailrelayd: {e}", file=sys.stderr)
        return EX_USAGE
    relay = None
    if args.now:  # before queueing: a transport that cannot work queues nothing
        configure(config.log_format, config.log_level)
        try:
            relay = make_relay(config)
        except ConfigError as e:
            print(f"mailrelayd: {e}", file=sys.stderr)
            return EX_CONFIG
    try:
        ident = queue_message(config, sender, args.recipients, message)
    except sqlite3.Error as e:
        print(f"mailrelayd: {config.db}: {e}", file=sys.stderr)
        return EX_NOINPUT
    except OSError as e:
        print(f"mailrelayd: {e.filename or config.spool or config.db}: {e.strerror or e}", file=sys.stderr)
        return EX_NOINPUT
    print(f"{ident}: queued for {', '.join(args.recipients)}")
    if relay is None:
        return 0
    try:
        if config.spool:  # written whole and renamed: no need to wait for it to settle
            relay.queue.notice("moved", f"{relay.queue.spool}/{ident}")
        report = relay.drain()
        if report.queue_error:
            print(f"mailrelayd: {report.queue_error}", file=sys.stderr)
            return report.exit_status
        state, details = _outcome(relay.queue, ident)
        print(f"{ident}: {state}" + (f" ({details})" if details else ""))
        others = report.sent + report.deferred + report.failed - (1 if state != "not delivered" else 0)
        if others:
            print(f"this pass also handled {others} other message{'s' if others != 1 else ''}")
        return report.exit_status
    finally:
        relay.transport.close()
        relay.queue.close()


# -- entry point -----------------------------------------------------------------------


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "test-message":
        parser.add_argument("recipients", metavar="TO", nargs="+", help="plain addresses (local@domain)")
        parser.add_argument("--subject", default=DEFAULT_SUBJECT, help=f"default: {DEFAULT_SUBJECT!r}")
        parser.add_argument("--body", metavar="FILE", help="UTF-8 text of the body (default: a short text)")
        parser.add_argument("--now", action="store_true",
                            help="deliver at once through the configured transport with one drain pass (which"
                                 " may deliver other due messages too) and report the outcome")


def main(command: str, argv: list[str]) -> int:
    from mailrelayd.cli import command_config

    loaded = command_config(command, argv, _HELP[command], _EPILOG[command], add_arguments)
    if isinstance(loaded, int):
        return loaded
    args, config = loaded
    if command == "check-config":
        return check_config(config, args)
    if config.queues or is_glob(config.queue_path):
        print("mailrelayd: test-message works on one queue: name it with --db or --spool", file=sys.stderr)
        return EX_USAGE
    return test_message(config, args)


_HELP = {
    "check-config": "Validate the configuration, print it in effect (the SMTP password file by path only) and"
                    " check that the delivery command, Maildir or password file and the queue are usable by"
                    " this user. Changes nothing.",
    "test-message": "Queue one test message (as Fossil would) and print its id; with --now, deliver it at once"
                    " and report the outcome.",
}
_EPILOG = {
    "check-config": "Exit status: 0 all is well, 64 bad command line, 78 a bad value or problems (each listed"
                    " on stderr).",
    "test-message": "Exit status: 0 queued (with --now: sent), 64 bad recipient or option, 66 queue unusable,"
                    " 78 bad configuration; with --now, 75 deferred and 65 failed, as a drain's.",
}
