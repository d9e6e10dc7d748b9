"""The composition root: queues, transports and relays, built from a Config.

This is the one place that knows which classes make up a running mailrelayd. The
command line and the service call it; queues and transports never import it. Each kind
of queue and transport is imported when it is made: a drain loads only what it uses.
"""

from __future__ import annotations

from mailrelayd import log
from mailrelayd.config import Config, ConfigError
from mailrelayd.queues import Queue
from mailrelayd.relay import Relay, RetryPolicy
from mailrelayd.supervision import Supervision
from mailrelayd.transports import Transport
from mailrelayd.transports.smtp import SmtpSettingsError


def make_queue(config: Config) -> Queue:
    """The queue one Config names (never a glob); nothing is opened yet."""
    if config.spool:
        from mailrelayd.queues.spool import SpoolQueue

        return SpoolQueue(config.spool, config.state_dir, settle=config.settle, max_size=config.max_size,
                          owner_uid=config.spool_owner, keep_sent=config.keep_sent,
                          sentlog_retention=config.sentlog_retention, refused_retention=config.refused_retention)
    from mailrelayd.queues.sqlite import SqliteQueue

    assert config.db is not None
    return SqliteQueue(config.db, lease=config.lease, sentlog_retention=config.sentlog_retention,
                       max_size=config.max_size, sql_timeout=config.sql_timeout,
                       refused_retention=config.refused_retention)


def make_transport(config: Config) -> Transport:
    """The configured transport; ConfigError if it cannot work as configured."""
    encode = config.utf8_headers == "encode"
    if config.maildir:
        from mailrelayd.transports.maildir import MaildirTransport

        return MaildirTransport(config.maildir, encode_utf8=encode)
    if not config.smtp.server:
        from mailrelayd.transports.pipe import PipeTransport

        return PipeTransport(config.command, config.timeout, config.permanent_exit_codes, encode_utf8=encode)
    from mailrelayd.transports.smtp import SmtpTransport

    try:
        # One connection per delivery in flight: the pool follows the relay's concurrency.
        connections = config.max_workers if config.workers == "auto" else int(config.workers)
        return SmtpTransport(config.smtp, password=config.smtp.read_password(), message_timeout=config.timeout,
                             max_connections=connections, encode_utf8=encode)
    except SmtpSettingsError as e:
        raise ConfigError(str(e)) from None


def make_relay(config: Config, supervision: Supervision = Supervision()) -> Relay:
    """The relay of one queue (a Config of queue_configs, never a glob), supervised so if
    a daemon runs it; ConfigError if its transport cannot work as configured."""
    queue = make_queue(config)
    transport = make_transport(config)
    retry = RetryPolicy(config.retry_delay, config.max_retry_delay, config.max_age)
    return Relay(queue, transport, workers=config.workers, max_workers=config.max_workers, retry=retry,
                 poll_interval=config.poll_interval,
                 envelope_from=config.envelope_from, notify_failed=config.notify_failed,
                 max_recipients=config.max_recipients, rate_limit=config.rate_limit, supervision=supervision)


def configure_log(config: Config, stream=None) -> None:
    """Log as configured: a file, syslog (also the default with --daemon), else `stream`
    (stderr). Raises OSError if the log file cannot be opened."""
    use_syslog = config.syslog or (config.daemon and not config.log_file)
    log.configure(config.log_format, config.log_level, stream, log_file=config.log_file,
                  syslog_address="/dev/log" if use_syslog else None)
