"""`mailrelayd [--drain]`: relay as a daemon (foreground, or --daemon), or one pass."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys

from mailrelayd import __version__, privileges
from mailrelayd.cli.options import Parser, add_config_options, fail, parse_and_load
from mailrelayd.compose import configure_log, make_queue, make_relay, make_transport
from mailrelayd.config import Config, ConfigError, expand, glob_problem
from mailrelayd.log import get_logger
from mailrelayd.privileges import PrivilegeError
from mailrelayd.queuelock import QueueLock
from mailrelayd.relay import DrainReport
from mailrelayd.terminal import clean

EPILOG = (
    "`mailrelayd enqueue [sendmail options] RCPT...` (also installed as mailrelayd-sendmail) "
    "queues a message into a spool instead. `mailrelayd status|list|show|retry|purge|check-config|"
    "test-message` look after the queue (each has --help). "
    "Every option is also a key of the TOML config file, with _ for -; flags win over the file; "
    "[[queue]] tables in the file give several queues to one process. "
    "Durations take s, m, h or d (300, 5m, 1h, 5d). Signals: TERM/INT stop after the deliveries in flight, "
    "HUP rereads the config and reopens the log file, USR1 scans now. Drain exit status: 0 all sent, "
    "75 some deferred, 65 some set aside as failed, 66 queue unreadable, 78 bad configuration, or started as "
    "root without --user or --allow-root. Daemon: 0 stopped, 66 no queue can work, 73 cannot create the log "
    "file or pidfile, 75 another mailrelayd holds a queue, 78 as for a drain."
)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="mailrelayd", usage="mailrelayd [--drain] [--config FILE] [OPTIONS]",
               description="Relay the mail that Fossil queues (in emailqueue.db or a spool directory) to"
               " sendmail (or a Maildir, or an SMTP server).", epilog=EPILOG)
    p.add_argument("--drain", action="store_true", help="deliver every message that is due, then exit")
    p.add_argument("--version", action="version", version=f"mailrelayd {__version__}")
    add_config_options(p)
    return p


def main(argv: list[str]) -> int:
    loaded = parse_and_load(parser(), argv)
    if isinstance(loaded, int):
        return loaded
    args, config = loaded
    if args.drain and (config.daemon or config.pidfile):
        return fail("--drain runs in the foreground and writes no pidfile", os.EX_USAGE)
    try:  # before anything is opened or created
        account = privileges.plan(config)
    except PrivilegeError as e:
        return fail(str(e), os.EX_CONFIG)
    progress = args.drain and sys.stderr.isatty() and not config.log_file and not config.syslog
    privileges.create_log_file(config.log_file, account)
    try:
        configure_log(config, _AboveTheBar(sys.stderr) if progress else None)
    except OSError as e:
        return fail(f"cannot open log_file {config.log_file}: {e.strerror or e}", os.EX_CANTCREAT)
    pidfile = None
    if config.pidfile:  # opened as root (if started so) and kept open: never reopened
        pidfile = QueueLock(config.pidfile)
        try:
            held_by = pidfile.acquire(write_pid=not config.daemon)  # --daemon: the detached child's pid, later
        except OSError as e:
            return fail(f"cannot write pidfile {config.pidfile}: {e.strerror or e}", os.EX_CANTCREAT)
        if held_by is not None:
            return fail(f"already running as pid {held_by} ({config.pidfile})", os.EX_TEMPFAIL)
    try:
        privileges.switch(account)  # before anything touches a queue or its lock file
        return _relay(args, config, progress, pidfile)
    except PrivilegeError as e:
        return fail(str(e), os.EX_CONFIG)
    finally:
        if pidfile:
            pidfile.release(clear=True)


def _relay(args: argparse.Namespace, config: Config, progress: bool, pidfile: QueueLock | None) -> int:
    """Check every queue's transport, then drain or serve, as the user that relays."""
    log = get_logger()
    queues = expand(config)
    try:  # every queue's transport must be buildable before anything starts
        for queue in queues:
            make_transport(queue).close()
    except ConfigError as e:
        return fail(str(e), os.EX_CONFIG)
    for queue in queues:
        if queue.smtp.insecure:
            log.warning("smtp_certificate_not_verified", server=queue.smtp.server,
                        note="smtp_insecure is set: anyone on the path can read and change the mail")
        if not queue.maildir and not queue.smtp.server and not _runnable(queue.command[0]):
            log.error("command_not_runnable", command=queue.command[0],
                      note="messages stay queued and are retried until it can be run")
    privileges.warn_if_root(log)
    if args.drain:
        return _drain(queues, log, progress, [p for q in config.queue_configs if (p := glob_problem(q))])
    return _serve(args, config, log, pidfile)


def _drain(queues: list[Config], log, progress: bool, unlisted: list[str]) -> int:
    """One pass over every queue, one after the other; the worst exit status (66 if a glob's
    directory could not be listed: `unlisted`, the problems)."""
    relays = [make_relay(q) for q in queues]
    total = DrainReport()
    for problem in unlisted:
        log.error("queue_unavailable", error=problem)
        total.add(DrainReport(queue_error=problem))
    if not relays and not unlisted:
        log.warning("no_queues_found", note="no file matches the configured glob")

    def stop(*_) -> None:
        for relay in relays:
            relay.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    bar = None
    if progress:
        from tqdm import tqdm

        size = shutil.get_terminal_size()  # 80x24 for a terminal of unknown size (tqdm would show nothing)
        bar = tqdm(total=sum(relay.pending() or 0 for relay in relays), unit="msg", delay=1.0, file=sys.stderr,
                   leave=False, ncols=size.columns, nrows=size.lines)
    try:
        for relay in relays:
            try:
                report = relay.drain(progress=(lambda _: bar.update(1)) if bar else None)
            finally:
                relay.transport.close()
            if report.queue_error:
                log.error("queue_unavailable", queue=relay.queue.name, error=report.queue_error)
            total.add(report)
    finally:
        if bar is not None:
            bar.close()
    log.info("drain_done", sent=total.sent, deferred=total.deferred, failed=total.failed, refused=total.refused,
             exit_status=total.exit_status)
    return total.exit_status


def _serve(args: argparse.Namespace, config: Config, log, pidfile: QueueLock | None) -> int:
    """The daemon: lock the queues, detach if asked, supervise the relays."""
    from mailrelayd.cli.options import load
    from mailrelayd.sdnotify import Notifier
    from mailrelayd.service import QueueHeld, Service

    service = Service(config, build_relay=make_relay, reload_config=lambda: load(args),
                      lock_path=lambda queue: make_queue(queue).lock_path, configure_log=configure_log)
    try:
        service.claim_queues()
    except QueueHeld as e:
        log.error("queue_held", queue=str(e.path), pid=e.pid)
        return fail(clean(str(e)), os.EX_TEMPFAIL)  # a glob's match may be named by a jail
    if config.daemon:
        import daemon

        from mailrelayd.log import log_fds

        keep = service.keep_fds() + ([pidfile.fileno()] if pidfile else []) + log_fds()
        # Already the relay's user: DaemonContext's uid and gid (getuid(), getgid()) change nothing.
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
            return fail(f"cannot serve metrics on {config.metrics}: {e.strerror or e}", os.EX_CONFIG)
    service.catch_signals()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: service.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
    signal.signal(signal.SIGUSR1, lambda *_: service.request_scan())
    return service.run()


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
