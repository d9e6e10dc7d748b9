"""The `mailrelayd` command: parse flags, build the config, run or drain the relay."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from mailrelayd import __version__
from mailrelayd.config import DEFAULT_CONFIG, OPTIONS, Config, ConfigError, build, read_toml
from mailrelayd.log import configure, get_logger
from mailrelayd.queues import Queue
from mailrelayd.queues.spool import SpoolQueue
from mailrelayd.queues.sqlite import SqliteQueue
from mailrelayd.relay import Relay, RetryPolicy
from mailrelayd.transports.maildir import MaildirTransport
from mailrelayd.transports import Transport
from mailrelayd.transports.pipe import PipeTransport
from mailrelayd.transports.smtp import SmtpSettings, SmtpSettingsError, SmtpTransport

EX_USAGE, EX_CONFIG = 64, 78
ADMIN_COMMANDS = ("status", "list", "show", "retry", "purge",  # mailrelayd/admin.py
                  "check-config", "test-message")  # mailrelayd/admin_setup.py


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):  # name the options, never echo values (a secret?)
            unknown = [a.split("=", 1)[0] for a in message.split(": ", 1)[1].split() if a.startswith("-")]
            message = "unknown option " + ", ".join(unknown) if unknown else "unexpected arguments"
        self.exit(EX_USAGE, f"mailrelayd: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mailrelayd",
        allow_abbrev=False,  # else --smtp-password SECRET would be taken for --smtp-password-file
        description="Relay the mail that Fossil queues (in emailqueue.db or a spool directory) to sendmail"
        " (or a Maildir).",
        epilog="`mailrelayd enqueue [sendmail options] RCPT...` (also installed as mailrelayd-sendmail) "
        "queues a message into a spool instead. `mailrelayd status|list|show|retry|purge` look after the "
        "queue (each has --help). "
        "Every option is also a key of the TOML config file, with _ for -; flags win over the file. "
        "Durations take s, m, h or d (300, 5m, 1h, 5d). Drain exit status: 0 all sent, 75 some deferred, "
        "65 some set aside as failed, 66 queue unreadable, 78 bad configuration.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"TOML configuration (default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--drain", action="store_true", help="deliver every message that is due, then exit")
    parser.add_argument("--version", action="version", version=f"mailrelayd {__version__}")
    for option in OPTIONS:
        flag = "--" + option.key.replace("_", "-")
        if option.metavar:
            parser.add_argument(flag, dest=option.key, metavar=option.metavar, help=option.help,
                                default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=option.key, action="store_const", const=True, help=option.help,
                                default=argparse.SUPPRESS)
    return parser


def load(args: argparse.Namespace) -> Config:
    flags = {o.key: getattr(args, o.key) for o in OPTIONS if hasattr(args, o.key)}
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    file_values = read_toml(path) if args.config or DEFAULT_CONFIG.exists() else {}
    return build(file_values, flags, source=str(path))


def command_config(command: str, argv: list[str], description: str, epilog: str,
                   add_arguments) -> tuple[argparse.Namespace, Config] | int:
    """Parse an admin command's arguments (the daemon's queue and config options plus its
    own) and load the configuration; an int is the exit status of a bad configuration."""
    parser = _parser()
    parser.prog, parser.description, parser.epilog = f"mailrelayd {command}", description, epilog
    add_arguments(command, parser)
    args = parser.parse_args(argv)
    try:
        return args, load(args)
    except ConfigError as e:
        print(f"mailrelayd: {e}", file=sys.stderr)
        return EX_CONFIG


def make_queue(config: Config) -> Queue:
    if config.spool:
        return SpoolQueue(config.spool, config.state_dir, settle=config.settle, max_size=config.max_size,
                          owner_uid=config.spool_owner, keep_sent=config.keep_sent,
                          sentlog_retention=config.sentlog_retention)
    return SqliteQueue(config.db, lease=config.lease, sentlog_retention=config.sentlog_retention)


def make_transport(config: Config) -> Transport:
    """The configured transport; ConfigError if it cannot work as configured."""
    if config.maildir:
        return MaildirTransport(config.maildir)
    if not config.smtp_server:
        return PipeTransport(config.command, config.timeout, config.permanent_exit_codes)
    password = None
    if config.smtp_password_file:
        try:
            password = config.smtp_password_file.read_text().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"cannot read smtp_password_file {config.smtp_password_file}: {e.strerror}") from None
    settings = SmtpSettings(
        server=config.smtp_server, port=config.smtp_port,
        use_tls=config.use_tls or ("implicit" if config.smtp_port == 465 else "starttls"),
        ca_file=str(config.smtp_ca_file) if config.smtp_ca_file else None, insecure=config.smtp_insecure,
        user=config.smtp_user, password=password, allow_plaintext_auth=config.smtp_allow_plaintext_auth,
        envelope_from=config.smtp_from, default_domain=config.smtp_default_domain,
        use_short_addr=config.use_short_addr, always_bcc=config.smtp_always_bcc, helo=config.smtp_helo,
        max_messages=config.smtp_max_messages, idle_timeout=config.smtp_idle_timeout,
        connect_timeout=config.smtp_connect_timeout, reply_timeout=config.smtp_reply_timeout,
        message_timeout=config.timeout, max_connections=config.workers,
    )
    try:
        return SmtpTransport(settings)
    except SmtpSettingsError as e:
        raise ConfigError(str(e)) from None


def make_relay(config: Config) -> Relay:
    queue = make_queue(config)
    transport = make_transport(config)
    retry = RetryPolicy(config.retry_delay, config.max_retry_delay, config.max_age)
    return Relay(queue, transport, workers=config.workers, retry=retry,
                 poll_interval=config.poll_interval, envelope_from=config.envelope_from)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["enqueue"]:  # the sendmail-compatible injector, also `mailrelayd-sendmail`
        from mailrelayd import inject

        return inject.main(argv[1:])
    if argv[:1] and argv[0] in ADMIN_COMMANDS:  # status, list, show, retry, purge
        from mailrelayd import admin

        return admin.main(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    try:
        config = load(args)
    except ConfigError as e:
        print(f"mailrelayd: {e}", file=sys.stderr)
        return EX_CONFIG
    configure(config.log_format, config.log_level)
    log = get_logger()
    try:
        relay = make_relay(config)
    except ConfigError as e:
        print(f"mailrelayd: {e}", file=sys.stderr)
        return EX_CONFIG
    if config.smtp_insecure:
        log.warning("smtp_certificate_not_verified", server=config.smtp_server,
                    note="smtp_insecure is set: anyone on the path can read and change the mail")
    if not config.maildir and not config.smtp_server and not _runnable(config.command[0]):
        log.error("command_not_runnable", command=config.command[0],
                  note="messages stay queued and are retried until it can be run")
    try:
        if args.drain:
            return _drain(relay, log)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: relay.stop())
        signal.signal(signal.SIGUSR1, lambda *_: relay.wake())
        return relay.run()
    finally:
        relay.transport.close()


def _drain(relay: Relay, log) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: relay.stop())
    report = relay.drain()
    if report.queue_error:
        log.error("queue_unavailable", error=report.queue_error)
    log.info("drain_done", sent=report.sent, deferred=report.deferred, failed=report.failed,
             exit_status=report.exit_status)
    return report.exit_status


def _runnable(program: str) -> bool:
    found = shutil.which(program)
    return found is not None and os.access(found, os.X_OK)
