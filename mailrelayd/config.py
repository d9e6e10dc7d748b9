"""The one frozen configuration: built once from defaults, the TOML file and flags.

Every setting has a TOML key and a command-line flag of the same name (`poll_interval`
and `--poll-interval`); flags win over the file, the file over defaults. Values are
checked here, once; a bad one raises ConfigError with a single line naming the key.
The SMTP keys are declared by SmtpSettings (transports/smtp/settings.py) and held in
`Config.smtp`; the parsers are in values.py.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mailrelayd import values
from mailrelayd.transports.smtp.settings import OPTIONS as SMTP_OPTIONS
from mailrelayd.transports.smtp.settings import SmtpSettings
from mailrelayd.values import Option

DEFAULT_CONFIG = Path("/etc/mailrelayd.toml")


class ConfigError(Exception):
    """A setting is missing, unknown or has a bad value (exit status 78)."""


DEFAULT_RATE = values.Rate(10000, 3600.0)  # a forum post to a few thousand subscribers passes


@dataclass(frozen=True)
class Config:
    db: Path | None = None
    spool: Path | None = None
    state_dir: Path | None = None
    settle: float = 2.0
    keep_sent: bool = False
    max_size: int = 25 * 2**20
    max_recipients: int = 100
    rate_limit: values.Rate | None = DEFAULT_RATE
    spool_owner: int | None = None
    command: tuple[str, ...] = ("/usr/sbin/sendmail", "-ti")
    maildir: Path | None = None
    utf8_headers: str = "encode"
    smtp: SmtpSettings = field(default_factory=SmtpSettings)  # the smtp_* keys, use_tls and use_short_addr
    workers: int | str = "auto"
    max_workers: int = 32
    timeout: float = 60.0
    sql_timeout: float = 2.0
    poll_interval: float = 10.0
    permanent_exit_codes: frozenset[int] = frozenset({65, 67})
    retry_delay: float = 300.0
    max_retry_delay: float = 3600.0
    max_age: float = 5 * 86400.0
    sentlog_retention: float = 30 * 86400.0
    refused_retention: float = 30 * 86400.0
    envelope_from: str = "header"
    notify_failed: str | None = None
    log_format: str = "auto"
    log_level: str = "info"
    log_file: Path | None = None
    syslog: bool = False
    daemon: bool = False
    pidfile: Path | None = None
    user: str | None = None  # a user's name (never root's), checked to exist
    allow_root: bool = False
    allow_concurrent: bool = False
    metrics: str | None = None
    # From [[queue]] tables: one Config per queue (the top-level keys, then the table's).
    queues: tuple[Config, ...] = ()

    @property
    def lease(self) -> float:
        """How long a claim keeps other hosts off a message: past any delivery's timeout."""
        return 2 * self.timeout + 60

    @property
    def queue_configs(self) -> tuple[Config, ...]:
        """The configured queues, each its own Config; db or spool may be a glob."""
        return self.queues or (self,)

    @property
    def queue_path(self) -> Path:
        return self.db or self.spool  # type: ignore[return-value]

    def items(self) -> Iterator[tuple[str, Any]]:
        """(key, value) of every setting, in OPTIONS order; the SMTP ones from `smtp`."""
        smtp = dict(self.smtp.items())
        for option in OPTIONS:
            yield option.key, smtp[option.key] if option.key in smtp else getattr(self, option.key)


OPTIONS = [
    Option("db", values.path, "FILE", "Fossil's email queue database (email-send-db)"),
    Option("spool", values.path, "DIR", "Fossil's spool directory (email-send-dir), instead of db"),
    Option("state_dir", values.path, "DIR", "where the spool's deferred, failed, corrupt and sent messages are kept,"
           " on the spool's file system (default: SPOOL.mailrelayd beside it)"),
    Option("settle", values.duration(0), "DURATION", "take a spool file nobody was seen closing once it is unchanged"
           " this long (default: 2s)"),
    Option("keep_sent", values.boolean, "", "keep sent spool files in STATE/sent until sentlog_retention"),
    Option("max_size", values.size, "SIZE", "refuse messages larger than this, unread (default: 25M)"),
    Option("max_recipients", values.int_range(1, 100000), "N", "set aside a message for more recipients than this"
           " (default: 100)"),
    Option("rate_limit", values.rate, "N/PERIOD", "send at most N messages per period (600/h, 100/10m; none: no"
           " limit); more wait (default: 10000/h)"),
    Option("spool_owner", values.user, "USER", "refuse spool files not owned by this user (default: any owner)"),
    Option("command", values.command, "CMD", "sendmail-compatible command, split like a shell but not run by one"
           " (default: '/usr/sbin/sendmail -ti')"),
    Option("maildir", values.path, "DIR", "deliver into this local Maildir instead of running a command"),
    Option("utf8_headers", values.choice("encode", "keep"), "MODE", "header text that is not ASCII: encode (as RFC"
           " 2047 encoded-words, the default) or keep (pass the bytes as they are); over SMTP to a server that"
           " offers SMTPUTF8 the bytes are kept"),
    *SMTP_OPTIONS,
    Option("workers", values.workers, "N", "deliveries run at once: a number, or auto (the default) to find it as"
           " it goes, up to max_workers"),
    Option("max_workers", values.int_range(1, 256), "N", "most deliveries workers = auto lets run at once"
           " (default: 32)"),
    Option("timeout", values.duration(1), "DURATION", "kill a delivery that takes longer (default: 60s)"),
    Option("sql_timeout", values.duration(0.1), "DURATION", "abort a statement on the SQLite queue that takes"
           " longer, and leave the queue for a while (default: 2s)"),
    Option("poll_interval", values.duration(0.1), "DURATION",
           "scan this often even without file events (default: 10s)"),
    Option("permanent_exit_codes", values.exit_codes, "LIST", "command exit statuses that mean the message itself is"
           " undeliverable (default: 65,67); every other failure is retried"),
    Option("retry_delay", values.duration(1), "DURATION", "first retry after a temporary failure (default: 5m)"),
    Option("max_retry_delay", values.duration(1), "DURATION", "longest wait between retries (default: 1h)"),
    Option("max_age", values.duration(0), "DURATION", "give up retrying a message this old (default: 5d)"),
    Option("sentlog_retention", values.duration(0), "DURATION", "keep sentlog rows this long (default: 30d)"),
    Option("refused_retention", values.duration(0), "DURATION", "keep refused messages (a spool's corrupt/, SQLite"
           " rows over max_size) this long (default: 30d)"),
    Option("envelope_from", values.envelope_from, "ADDR", "envelope sender: 'header' (Sender:, else From:),"
           " 'none', or a fixed address (default: header)"),
    Option("notify_failed", values.address, "ADDR", "send this address a short notice for each message set aside"),
    Option("log_format", values.choice("auto", "console", "json"), "FORMAT", "auto (key=value on a terminal, JSON"
           " lines otherwise), console or json (default: auto)"),
    Option("log_level", values.choice("debug", "info", "warning", "error"), "LEVEL", "least important events logged"
           " (default: info)"),
    Option("log_file", values.path, "FILE", "append log lines (JSON) to this file, reopened on SIGHUP (default: stderr;"
           " syslog with --daemon)"),
    Option("syslog", values.boolean, "", "log to syslog (/dev/log, facility mail)"),
    Option("daemon", values.boolean, "", "detach into the background (not under systemd)"),
    Option("pidfile", values.path, "FILE", "write the pid here, locked while running"),
    Option("user", values.account, "USER", "started as root, switch to this user and its groups before opening"
           " any queue (started as another user: must be that user)"),
    Option("allow_root", values.boolean, "", "started as root without user, relay as root anyway (else refused)"),
    Option("allow_concurrent", values.boolean, "", "run even when another mailrelayd already relays a queue"),
    Option("metrics", values.listen, "HOST:PORT", "serve Prometheus metrics on this address (default: off)"),
]
_BY_KEY = {o.key: o for o in OPTIONS}
parse_duration = values.duration(0)  # a duration given to a command (purge --older-than)
_SMTP_KEYS = frozenset(o.key for o in SMTP_OPTIONS)
assert set(_BY_KEY) == {f.name for f in fields(Config)} - {"queues", "smtp"} | _SMTP_KEYS
# Settings of the whole process, which a [[queue]] table cannot set.
PROCESS_KEYS = frozenset({"log_format", "log_level", "log_file", "syslog", "daemon", "pidfile", "user",
                          "allow_root", "allow_concurrent", "metrics"})
DELIVERY_WAYS = ("command", "maildir", "smtp_server")


def read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # only when there is a file to read

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def build(file_values: dict[str, Any], flag_values: dict[str, Any], source: str = "") -> Config:
    """The validated Config from the file's values overridden by the flags' values.

    A file with [[queue]] tables gives one Config per table in `queues` (its keys over
    the top-level ones); a --db or --spool flag names the one queue instead."""
    file_values = dict(file_values)
    tables = file_values.pop("queue", None)
    if tables is None or "db" in flag_values or "spool" in flag_values:
        return _build_one(file_values, flag_values, source)
    origin = source or "config"
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{origin}: 'queue' must be [[queue]] tables")
    if "db" in file_values or "spool" in file_values:
        raise ConfigError(f"{origin}: give queues either as db/spool or as [[queue]] tables, not both")
    queues, seen = [], set()
    for number, table in enumerate(tables, 1):
        where = f"{origin} [[queue]] {number}"
        for key in table:
            if key in PROCESS_KEYS or key == "queue":
                raise ConfigError(f"{where}: {key} applies to the whole process; set it at the top level")
        base = file_values
        if any(way in table for way in DELIVERY_WAYS):  # the table's way to deliver replaces the top level's
            base = {k: v for k, v in file_values.items() if k not in DELIVERY_WAYS}
        queue = _build_one({**base, **table}, flag_values, where)
        path = queue.queue_path.absolute()
        if path in seen:
            raise ConfigError(f"{where}: {path} is already another queue")
        seen.add(path)
        queues.append(queue)
    return replace(_build_one(file_values, flag_values, source, need_queue=False), queues=tuple(queues))


def expand(config: Config) -> list[Config]:
    """One Config per queue that exists now, a glob's matches in place of the glob."""
    found = []
    for queue in config.queue_configs:
        path = queue.queue_path
        if not is_glob(path):
            found.append(queue)
            continue
        key = "db" if queue.db else "spool"
        for match in sorted(glob.glob(str(path))):
            if key == "spool" and (match.endswith(".mailrelayd") or not Path(match).is_dir()):
                continue  # a state directory, or a file: not a spool
            found.append(replace(queue, db=Path(match)) if key == "db" else replace(queue, spool=Path(match)))
    return found


def is_glob(path: Path | None) -> bool:
    return path is not None and glob.has_magic(str(path))


def glob_problem(config: Config) -> str | None:
    """Why this user cannot look where a queue glob looks (it would match nothing, whatever
    is there), or None: its leading directory, up to the first wildcard, must be listable.
    A directory that does not exist yet is no problem (its queues are picked up later)."""
    path = config.queue_path
    if not is_glob(path):
        return None
    parts = path.absolute().parts
    base = Path(*parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))])
    try:
        os.listdir(base)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return f"{path}: cannot list {base}: {e.strerror or e} (the glob matches nothing there for this user)"
    return None


def _build_one(file_values: dict[str, Any], flag_values: dict[str, Any], source: str,
               need_queue: bool = True) -> Config:
    parsed: dict[str, Any] = {}
    for origin, given in ((source or "config", file_values), ("flag", flag_values)):
        for key, raw in given.items():
            option = _BY_KEY.get(key)
            if option is None:
                raise ConfigError(f"{origin}: unknown key '{key}'")
            try:
                parsed[key] = option.parse(raw)
            except ValueError as e:
                shown = f"--{key.replace('_', '-')}" if origin == "flag" else key
                table = origin.partition(" [[queue]] ")[2]
                where = f" in [[queue]] {table}" if table and origin != "flag" else ""
                raise ConfigError(f"bad value for {shown}{where} ({raw!r}): {e}") from None
    ways = [k for k in DELIVERY_WAYS if k in parsed]
    if len(ways) > 1:  # a flag overrides the file's way to deliver; two of one kind conflict
        by_flag = [k for k in ways if k in flag_values]
        if len(by_flag) != 1:
            raise ConfigError(f"{' and '.join(ways)} are all given: choose one way to deliver")
        for k in ways:
            if k not in by_flag:
                del parsed[k]
    if ("db" in parsed and "spool" in parsed) or (need_queue and "db" not in parsed and "spool" not in parsed):
        raise ConfigError("give one queue: db (--db FILE) or spool (--spool DIR), or [[queue]] tables")
    smtp = SmtpSettings.from_keys(parsed)
    config = Config(**{k: v for k, v in parsed.items() if k not in _SMTP_KEYS}, smtp=smtp)
    if config.max_retry_delay < config.retry_delay:
        raise ConfigError("bad value for max_retry_delay: shorter than retry_delay")
    if config.spool and is_glob(config.spool) and config.state_dir:
        raise ConfigError("state_dir cannot be set for a spool glob: each spool keeps its state beside it")
    return config
