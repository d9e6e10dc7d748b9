"""`mailrelayd check-config` and `mailrelayd test-message`: setting up.

check-config prints the configuration in effect and what mailrelayd.checks finds wrong
with it, changing nothing. test-message queues one message as Fossil would (a row in
`email`, or a spool file written atomically like the injector's) and, with --now, runs
one drain pass through the configured transport.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

from mailrelayd import checks, privileges
from mailrelayd.cli.options import Parser, add_config_options, fail, parse_and_load
from mailrelayd.compose import configure_log, make_queue, make_relay
from mailrelayd.config import PROCESS_KEYS, Config, ConfigError, expand, glob_problem, is_glob
from mailrelayd.inject import enqueue, is_plain_address
from mailrelayd.log import get_logger
from mailrelayd.notice import probe_message
from mailrelayd.privileges import PrivilegeError
from mailrelayd.queues import Queue, QueueError
from mailrelayd.terminal import clean, one_line, when

COMMANDS = ("check-config", "test-message")
DEFAULT_SUBJECT = "Test message from mailrelayd"
DEFAULT_BODY = ("This is a test message queued by `mailrelayd test-message`.\n"
                "If you can read it, the relay delivers this queue's mail.\n")
USAGE = {
    "check-config": "mailrelayd check-config [--config FILE] [OPTIONS]",
    "test-message": "mailrelayd test-message TO... [--subject S] [--body FILE] [--now] [--config FILE] [OPTIONS]",
}
HELP = {
    "check-config": "Validate the configuration, print it in effect (the SMTP password file by path only) and"
                    " check that the delivery command, Maildir or password file and the queue are usable by"
                    " this user. Changes nothing.",
    "test-message": "Queue one test message (as Fossil would) and print its id; with --now, deliver it at once"
                    " and report the outcome.",
}
EPILOG = {
    "check-config": "Exit status: 0 all is well, 64 bad command line, 78 a bad value or problems (each listed"
                    " on stderr).",
    "test-message": "Exit status: 0 queued (with --now: sent), 64 bad recipient or option, 66 queue unusable,"
                    " 73 the log file cannot be opened, 78 bad configuration (also: run as root without --user or"
                    " --allow-root); with --now, 75 deferred and 65 failed, as a drain's.",
}


def parser(command: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"mailrelayd {command}", usage=USAGE[command], description=HELP[command],
               epilog=EPILOG[command])
    if command == "test-message":
        p.add_argument("recipients", metavar="TO", nargs="+", help="plain addresses (local@domain)")
        p.add_argument("--subject", default=DEFAULT_SUBJECT, help=f"default: {DEFAULT_SUBJECT!r}")
        p.add_argument("--body", metavar="FILE", help="UTF-8 text of the body (default: a short text)")
        p.add_argument("--now", action="store_true",
                       help="deliver at once through the configured transport with one drain pass (which"
                            " may deliver other due messages too) and report the outcome")
    add_config_options(p)
    return p


def main(command: str, argv: list[str]) -> int:
    loaded = parse_and_load(parser(command), argv)
    if isinstance(loaded, int):
        return loaded
    args, config = loaded
    if command == "check-config":
        return check_config(config)
    if config.queues or is_glob(config.queue_path):
        return fail("test-message works on one queue: name it with --db or --spool", os.EX_USAGE)
    try:  # the relay's rule: before anything is opened
        account = privileges.plan(config)
    except PrivilegeError as e:
        return fail(str(e), os.EX_CONFIG)
    return test_message(config, args, account)


# -- check-config --------------------------------------------------------------------------


def check_config(config: Config) -> int:
    for line in effective_lines(config):
        print(line)
    problems: list[str] = []
    try:  # the checks are made as the relay would run: as `user` when started as root
        account = privileges.plan(config)
        privileges.switch(account)
    except PrivilegeError as e:
        problems.append(str(e))
    else:
        if account is not None:
            print(f"# checked as user {account.name}")
    for table in config.queues:
        print("\n[[queue]]")
        for line in effective_lines(table, base=config):
            print(line)
        if is_glob(table.queue_path):
            matches = [q.queue_path for q in expand(replace(config, queues=(table,)))]
            print(clean(f"# matches now: {', '.join(map(str, matches)) or 'nothing (picked up when it appears)'}"))
    problems += [p for q in config.queue_configs if (p := glob_problem(q))]
    for queue in expand(config):
        problems += [p for p in checks.transport_problems(queue) + checks.queue_problems(queue) if p not in problems]
    for problem in problems:
        fail(clean(problem), os.EX_CONFIG)
    if problems:
        print(f"# {len(problems)} problem{'s' if len(problems) != 1 else ''} (on stderr)")
        return os.EX_CONFIG
    print("# configuration OK")
    return 0


def effective_lines(config: Config, base: Config | None = None) -> list[str]:
    """Every key = value, TOML-like; unset keys commented; the password file by path only.
    With `base` (the top level, for a [[queue]] table): only what differs from it."""
    lines = []
    inherited = dict(base.items()) if base is not None else {}
    for key, value in config.items():
        if key in PROCESS_KEYS and base is not None:
            continue
        if base is not None and (value is None or (value == inherited[key] and key not in ("db", "spool"))):
            continue
        if key == "state_dir" and config.spool:
            value = checks.state_dir(config)
        if value is None:
            lines.append(f"# {key} = (not set)")
        elif key == "smtp_password_file":
            readable = os.path.isfile(value) and os.access(value, os.R_OK)
            lines.append(f"{key} = {_toml(value)}  # {'readable' if readable else 'NOT readable'},"
                         " content not shown")
        else:
            lines.append(f"{key} = {_toml(value)}")
    return lines


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return "[" + ", ".join(_toml(v) for v in items) + "]"
    return json.dumps(str(value))  # a TOML basic string


# -- test-message --------------------------------------------------------------------------


def test_message(config: Config, args, account: privileges.Account | None) -> int:
    bad = [r for r in args.recipients if not is_plain_address(r, need_domain=True)]
    for r in bad:
        fail(f"not a plain address: {r!r}"[:200], os.EX_USAGE)
    if bad:
        return os.EX_USAGE
    body = DEFAULT_BODY
    if args.body:
        try:
            body = Path(args.body).read_bytes().decode("utf-8")
        except OSError as e:
            return fail(f"{args.body}: {e.strerror}", os.EX_NOINPUT)
        except UnicodeDecodeError:
            return fail(f"{args.body}: not UTF-8 text", os.EX_USAGE)
    sender = config.envelope_from if config.envelope_from not in ("header", "none") else \
        "mailrelayd@" + socket.getfqdn()
    try:
        message = probe_message(sender, args.recipients, args.subject, body)
    except ValueError as e:
        return fail(str(e), os.EX_USAGE)
    if args.now:  # as the daemon does: the log opened, then the switch to the relay's user
        privileges.create_log_file(config.log_file, account)
        try:
            configure_log(config)
        except OSError as e:
            return fail(f"cannot open log_file {config.log_file}: {e.strerror or e}", os.EX_CANTCREAT)
    relay = None
    try:
        privileges.switch(account)
        if args.now:  # before queueing: a transport that cannot work queues nothing
            relay = make_relay(config)
            privileges.warn_if_root(get_logger())
    except (PrivilegeError, ConfigError) as e:
        return fail(str(e), os.EX_CONFIG)
    try:
        if config.spool:
            ident = enqueue(str(config.spool), sender, args.recipients, message)
        else:
            ident = _insert(config, message)
    except QueueError as e:
        return fail(clean(str(e)), os.EX_NOINPUT)
    except OSError as e:
        return fail(clean(f"{e.filename or config.queue_path}: {e.strerror or e}"), os.EX_NOINPUT)
    print(f"{ident}: queued for {', '.join(args.recipients)}")
    if relay is None:
        return 0
    try:
        if config.spool:  # written whole and renamed: no need to wait for it to settle
            relay.queue.notice("moved", f"{config.spool.absolute()}/{ident}")
        report = relay.drain()
        if report.queue_error:
            return fail(clean(report.queue_error), report.exit_status)
        state, details = _outcome(relay.queue, ident)
        print(clean(f"{ident}: {state}" + (f" ({details})" if details else "")))
        others = report.sent + report.deferred + report.failed - (1 if state != "not delivered" else 0)
        if others:
            print(f"this pass also handled {others} other message{'s' if others != 1 else ''}")
        return report.exit_status
    finally:
        relay.transport.close()
        relay.queue.close()


def _insert(config: Config, message: bytes) -> str:
    """One row in `email`, as Fossil writes it, through the queue."""
    queue = make_queue(config)
    try:
        queue.open()
        return queue.add(message, time.time())
    finally:
        queue.close()


def _outcome(queue: Queue, ident: str) -> tuple[str, str]:
    """(state, details) of message `ident` after a drain pass."""
    now = time.time()
    entry = queue.find(ident, now)
    if entry is None:
        entry = next((e for e in queue.entries({"failed"}, now) if e.origin == ident), None)
    if entry is None:
        return "sent", ""
    if entry.state == "failed":
        return "failed", f"set aside as {entry.id}: {one_line(entry.reason)}"
    if entry.state == "deferred":
        return "deferred", f"next try {when(entry.next_try)}: {one_line(entry.last_error)}"
    return "not delivered", "still queued (not taken in this pass)"
