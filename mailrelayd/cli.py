"""The `mailrelayd` command: parse flags, build the config, run or drain the relay."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from mailrelayd import __version__
from mailrelayd.config import DEFAULT_CONFIG, OPTIONS, Config, ConfigError, build, expand, read_toml
from mailrelayd.log import configure, get_logger
from mailrelayd.queues import Queue
from mailrelayd.queues.spool import SpoolQueue
from mailrelayd.queues.sqlite import SqliteQueue
from mailrelayd.relay import DrainReport, Relay, RetryPolicy
from mailrelayd.transports.maildir import MaildirTransport
from mailrelayd.transports import Transport
from mailrelayd.transports.pipe import PipeTransport
from mailrelayd.transports.smtp import SmtpSettings, SmtpSettingsError, SmtpTransport

EX_USAGE, EX_CANTCREAT, EX_CONFIG = 64, 73, 78
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
        "queues a message into a spool instead. `mailrelayd status|list|show|retry|purge|check-config|"
        "test-message` look after the queue (each has --help). "
        "Every option is also a key of the TOML config file, with _ for -; flags win over the file; "
        "[[queue]] tables in the file give several queues to one process. "
        "Durations take s, m, h or d (300, 5m, 1h, 5d). Signals: TERM/INT stop after the deliveries in flight, "
        "HUP rereads the config and reopens the log file, USR1 scans now. Drain exit status: 0 all sent, "
        "75 some deferred, 65 some set aside as failed, 66 queue unreadable, 78 bad configuration. Daemon: "
        "0 stopped, 66 no queue can work, 73 cannot create the log file or pidfile, 75 another mailrelayd "
        "holds a queue, 78 bad configuration.",
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
    """The relay of one queue (a Config of queue_configs, never a glob)."""
    queue = make_queue(config)
    transport = make_transport(config)
    retry = RetryPolicy(config.retry_delay, config.max_retry_delay, config.max_age)
    return Relay(queue, transport, workers=config.workers, retry=retry, poll_interval=config.poll_interval,
                 envelope_from=config.envelope_from, notify_failed=config.notify_failed)


def configure_log(config: Config, stream=None) -> None:
    """Log as configured: a file, syslog (also the default with --daemon), else stderr."""
    use_syslog = config.syslog or (config.daemon and not config.log_file)
    configure(config.log_format, config.log_level, stream, log_file=config.log_file,
              syslog_address="/dev/log" if use_syslog else None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["enqueue"]:  # the sendmail-compatible injector, also `mailrelayd-sendmail`
        from mailrelayd import inject

        return inject.main(argv[1:])
    if argv[:1] and argv[0] in ADMIN_COMMANDS:  # status, list, show, retry, purge, ...
        from mailrelayd import admin

        return admin.main(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    try:
        config = load(args)
    except ConfigError as e:
        print(f"mailrelayd: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.drain and (config.daemon or config.pidfile):
        print("mailrelayd: --drain runs in the foreground and writes no pidfile", file=sys.stderr)
        return EX_USAGE
    progress = args.drain and sys.stderr.isatty() and not config.log_file and not config.syslog
    try:
        configure_log(config, _AboveTheBar(sys.stderr) if progress else None)
    except OSError as e:
        print(f"mailrelayd: cannot open log_file {config.log_file}: {e.strerror or e}", file=sys.stderr)
        return EX_CANTCREAT
    log = get_logger()
    queues = expand(config)
    try:  # every queue's transport must be buildable before anything starts
        for queue in queues:
            make_transport(queue).close()
    except ConfigError as e:
        print(f"mailrelayd: {e}", file=sys.stderr)
        return EX_CONFIG
    for queue in queues:
        if queue.smtp_insecure:
            log.warning("smtp_certificate_not_verified", server=queue.smtp_server,
                        note="smtp_insecure is set: anyone on the path can read and change the mail")
        if not queue.maildir and not queue.smtp_server and not _runnable(queue.command[0]):
            log.error("command_not_runnable", command=queue.command[0],
                      note="messages stay queued and are retried until it can be run")
    if args.drain:
        return _drain(queues, log, progress)
    return _serve(args, config, log)


def _drain(queues: list[Config], log, progress: bool) -> int:
    """One pass over every queue, one after the other; the worst exit status."""
    relays = [make_relay(q) for q in queues]
    if not relays:
        log.warning("no_queues_found", note="no file matches the configured glob")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: [relay.stop() for relay in relays])
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(relay.pending() or 0 for relay in relays)
        size = shutil.get_terminal_size()  # 80x24 for a terminal of unknown size (tqdm would show nothing)
        bar = tqdm(total=total, unit="msg", delay=1.0, file=sys.stderr, leave=False, ncols=size.columns,
                   nrows=size.lines)
    total = DrainReport()
    try:
        for relay in relays:
            try:
                report = relay.drain(progress=(lambda _: bar.update(1)) if bar else None)
            finally:
                relay.transport.close()
            if report.queue_error:
                log.error("queue_unavailable", queue=relay.queue.name, error=report.queue_error)
                total.queue_error = report.queue_error
            total.sent, total.deferred, total.failed = (total.sent + report.sent, total.deferred + report.deferred,
                                                        total.failed + report.failed)
    finally:
        if bar is not None:
            bar.close()
    log.info("drain_done", sent=total.sent, deferred=total.deferred, failed=total.failed,
             exit_status=total.exit_status)
    return total.exit_status


def _serve(args: argparse.Namespace, config: Config, log) -> int:
    """The daemon: lock the queues (and pidfile), detach if asked, supervise the relays."""
    from mailrelayd.queuelock import QueueLock
    from mailrelayd.sdnotify import Notifier
    from mailrelayd.service import EX_TEMPFAIL, QueueHeld, Service

    service = Service(config, build_relay=make_relay, reload_config=lambda: load(args),
                      lock_path=lambda queue: make_queue(queue).lock_path, configure_log=configure_log)
    try:
        service.claim_queues()
    except QueueHeld as e:
        print(f"mailrelayd: {e}", file=sys.stderr)
        log.error("queue_held", queue=str(e.path), pid=e.pid)
        return EX_TEMPFAIL
    pidfile = None
    if config.pidfile:
        pidfile = QueueLock(config.pidfile)
        try:
            held_by = pidfile.acquire()
        except OSError as e:
            print(f"mailrelayd: cannot write pidfile {config.pidfile}: {e.strerror or e}", file=sys.stderr)
            return EX_CANTCREAT
        if held_by is not None:
            print(f"mailrelayd: already running as pid {held_by} ({config.pidfile})", file=sys.stderr)
            return EX_TEMPFAIL
    if config.daemon:
        import daemon

        from mailrelayd.log import log_fds

        keep = service.lock_fds() + ([pidfile.fileno()] if pidfile else []) + log_fds()
        daemon.DaemonContext(working_directory="/", umask=0o027, detach_process=True, files_preserve=keep,
                             signal_map={}).open()
        service.rewrite_pids()
        if pidfile:
            pidfile.rewrite_pid()
    service.notifier = Notifier.from_environment()
    if config.metrics:
        from mailrelayd.metrics import Metrics, parse_listen

        service.metrics = Metrics()
        try:
            service.metrics.serve(*parse_listen(config.metrics))
        except OSError as e:
            log.critical("metrics_unavailable", address=config.metrics, error=e.strerror or str(e))
            print(f"mailrelayd: cannot serve metrics on {config.metrics}: {e.strerror or e}", file=sys.stderr)
            return EX_CONFIG
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: service.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
    signal.signal(signal.SIGUSR1, lambda *_: service.request_scan())
    try:
        return service.run()
    finally:
        if pidfile:
            pidfile.release(clear=True)


class _AboveTheBar:
    """A log stream that keeps log lines above a drain's progress bar."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        from tqdm import tqdm

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _runnable(program: str) -> bool:
    found = shutil.which(program)
    return found is not None and os.access(found, os.X_OK)
