"""The one frozen configuration: built once from defaults, the TOML file and flags.

Every setting has a TOML key and a command-line flag of the same name (`poll_interval`
and `--poll-interval`); flags win over the file, the file over defaults. Values are
checked here, once; a bad one raises ConfigError with a single line naming the key.
"""

from __future__ import annotations

import glob
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/mailrelayd.toml")


class ConfigError(Exception):
    """A setting is missing, unknown or has a bad value (exit status 78)."""


@dataclass(frozen=True)
class Config:
    db: Path | None = None
    spool: Path | None = None
    state_dir: Path | None = None
    settle: float = 2.0
    keep_sent: bool = False
    max_size: int = 25 * 2**20
    spool_owner: int | None = None
    command: tuple[str, ...] = ("/usr/sbin/sendmail", "-ti")
    maildir: Path | None = None
    smtp_server: str | None = None
    smtp_port: int = 25
    use_tls: str | None = None  # None: implicit on port 465, else starttls
    smtp_ca_file: Path | None = None
    smtp_insecure: bool = False
    smtp_user: str | None = None
    smtp_password_file: Path | None = None
    smtp_allow_plaintext_auth: bool = False
    smtp_from: str | None = None
    smtp_default_domain: str | None = None
    use_short_addr: bool = False
    smtp_always_bcc: tuple[str, ...] = ()
    smtp_helo: str | None = None
    smtp_max_messages: int = 100
    smtp_idle_timeout: float = 30.0
    smtp_connect_timeout: float = 30.0
    smtp_reply_timeout: float = 60.0
    workers: int = 4
    timeout: float = 60.0
    poll_interval: float = 10.0
    permanent_exit_codes: frozenset[int] = frozenset({65, 67})
    retry_delay: float = 300.0
    max_retry_delay: float = 3600.0
    max_age: float = 5 * 86400.0
    sentlog_retention: float = 30 * 86400.0
    envelope_from: str = "header"
    notify_failed: str | None = None
    log_format: str = "auto"
    log_level: str = "info"
    log_file: Path | None = None
    syslog: bool = False
    daemon: bool = False
    pidfile: Path | None = None
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


# -- value parsers: each takes a TOML value or a flag's string, returns the value or
#    raises ValueError saying what is expected ------------------------------------------


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a path")
    return Path(value)


def _command(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError("expected a command line such as '/usr/sbin/sendmail -ti'")
    try:
        argv = tuple(shlex.split(value))
    except ValueError as e:
        raise ValueError(f"cannot split it like a shell would: {e}") from None
    if not argv:
        raise ValueError("expected a command line such as '/usr/sbin/sendmail -ti'")
    return argv


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)):
            seconds = float(m[1]) * _UNITS[m[2]]
        else:
            raise ValueError("expected a duration such as 30, 30s, 5m, 1h or 5d")
        if not minimum <= seconds <= 10 * 365 * 86400:
            raise ValueError(f"expected a duration of at least {minimum:g} s")
        return seconds

    return parse


parse_duration = _duration(0)


def _exit_codes(value: Any) -> frozenset[int]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of exit statuses such as 65,67")
    parse = _int_range(1, 255)
    try:
        codes = frozenset(parse(v.strip() if isinstance(v, str) else v) for v in items if v != "")
    except ValueError:
        raise ValueError("expected a list of exit statuses from 1 to 255, such as 65,67") from None
    if 75 in codes:
        raise ValueError("75 (EX_TEMPFAIL) always means try again later")
    return codes


def _envelope_from(value: Any) -> str:
    from mailrelayd.message import safe_address

    if value in ("header", "none") or (isinstance(value, str) and safe_address(value)):
        return value
    raise ValueError("expected 'header', 'none' or an address such as noreply@example.org")


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", value, re.IGNORECASE)):
        size = int(m[1]) * 1024 ** " KMG".index(m[2].upper() or " ")
        if size > 0:
            return size
    raise ValueError("expected a size such as 25M, 512K or 1000000")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError("expected true or false")


def _user(value: Any) -> int:
    import pwd

    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except (KeyError, TypeError):
        raise ValueError("expected a user name or uid that exists on this host") from None


def _host(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,253}", value) and not value.startswith("-"):
        return value
    raise ValueError("expected a host name or address")


def _address(value: Any) -> str:
    from mailrelayd.message import safe_address

    if isinstance(value, str) and safe_address(value):
        return value
    raise ValueError("expected a plain address such as noreply@example.org")


def _addresses(value: Any) -> tuple[str, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of addresses")
    return tuple(_address(v) for v in items if v)


def _domain(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", value):
        return value
    raise ValueError("expected a domain such as example.org")


def _text(value: Any) -> str:
    if isinstance(value, str) and value and value.isprintable() and not value.startswith("-"):
        return value
    raise ValueError("expected a word")


def _listen(value: Any) -> str:
    from mailrelayd.metrics import parse_listen

    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT such as 127.0.0.1:9464")
    parse_listen(value)
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse


@dataclass(frozen=True)
class Option:
    key: str
    parse: Callable[[Any], Any]
    metavar: str  # "" for a flag that takes no value
    help: str


OPTIONS = [
    Option("db", _path, "FILE", "Fossil's email queue database (email-send-db)"),
    Option("spool", _path, "DIR", "Fossil's spool directory (email-send-dir), instead of db"),
    Option("state_dir", _path, "DIR", "where the spool's deferred, failed, corrupt and sent messages are kept,"
           " on the spool's file system (default: SPOOL.mailrelayd beside it)"),
    Option("settle", _duration(0), "DURATION", "take a spool file nobody was seen closing once it is unchanged"
           " this long (default: 2s)"),
    Option("keep_sent", _bool, "", "keep sent spool files in STATE/sent until sentlog_retention"),
    Option("max_size", _size, "SIZE", "refuse spool files larger than this (default: 25M)"),
    Option("spool_owner", _user, "USER", "refuse spool files not owned by this user (default: any owner)"),
    Option("command", _command, "CMD", "sendmail-compatible command, split like a shell but not run by one"
           " (default: '/usr/sbin/sendmail -ti')"),
    Option("maildir", _path, "DIR", "deliver into this local Maildir instead of running a command"),
    Option("smtp_server", _host, "HOST", "send to this SMTP server (smarthost) instead of running a command"),
    Option("smtp_port", _int_range(1, 65535), "PORT", "the SMTP server's port (default: 25)"),
    Option("use_tls", _choice("starttls", "implicit", "none"), "MODE", "starttls, implicit or none"
           " (default: implicit on port 465, else starttls)"),
    Option("smtp_ca_file", _path, "FILE", "CA certificates (PEM) to verify the SMTP server with"),
    Option("smtp_insecure", _bool, "", "do not verify the SMTP server's certificate (unsafe)"),
    Option("smtp_user", _text, "USER", "log in to the SMTP server as this user"),
    Option("smtp_password_file", _path, "FILE", "file holding the SMTP password (never a flag or TOML value)"),
    Option("smtp_allow_plaintext_auth", _bool, "", "allow logging in without TLS"),
    Option("smtp_from", _address, "ADDR", "fixed SMTP envelope sender (default: as envelope_from)"),
    Option("smtp_default_domain", _domain, "DOMAIN", "append @DOMAIN to recipients without a domain"),
    Option("use_short_addr", _bool, "", "send recipients without a domain unchanged"),
    Option("smtp_always_bcc", _addresses, "LIST", "extra recipients of every message, never in its headers"),
    Option("smtp_helo", _host, "NAME", "name to give in EHLO (default: this host's)"),
    Option("smtp_max_messages", _int_range(1, 100000), "N", "messages per SMTP connection (default: 100)"),
    Option("smtp_idle_timeout", _duration(0.1), "DURATION", "close SMTP connections idle this long (default: 30s)"),
    Option("smtp_connect_timeout", _duration(0.1), "DURATION", "give up connecting after (default: 30s)"),
    Option("smtp_reply_timeout", _duration(0.1), "DURATION", "give up waiting for a reply after (default: 60s)"),
    Option("workers", _int_range(1, 256), "N", "deliveries run at once (default: 4)"),
    Option("timeout", _duration(1), "DURATION", "kill a delivery that takes longer (default: 60s)"),
    Option("poll_interval", _duration(0.1), "DURATION", "scan this often even without file events (default: 10s)"),
    Option("permanent_exit_codes", _exit_codes, "LIST", "command exit statuses that mean the message itself is"
           " undeliverable (default: 65,67); every other failure is retried"),
    Option("retry_delay", _duration(1), "DURATION", "first retry after a temporary failure (default: 5m)"),
    Option("max_retry_delay", _duration(1), "DURATION", "longest wait between retries (default: 1h)"),
    Option("max_age", _duration(0), "DURATION", "give up retrying a message this old (default: 5d)"),
    Option("sentlog_retention", _duration(0), "DURATION", "keep sentlog rows this long (default: 30d)"),
    Option("envelope_from", _envelope_from, "ADDR", "envelope sender: 'header' (Sender:, else From:),"
           " 'none', or a fixed address (default: header)"),
    Option("notify_failed", _address, "ADDR", "send this address a short notice for each message set aside"),
    Option("log_format", _choice("auto", "console", "json"), "FORMAT", "auto (key=value on a terminal, JSON"
           " lines otherwise), console or json (default: auto)"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "LEVEL", "least important events logged"
           " (default: info)"),
    Option("log_file", _path, "FILE", "append log lines (JSON) to this file, reopened on SIGHUP (default: stderr;"
           " syslog with --daemon)"),
    Option("syslog", _bool, "", "log to syslog (/dev/log, facility mail)"),
    Option("daemon", _bool, "", "detach into the background (not under systemd)"),
    Option("pidfile", _path, "FILE", "write the pid here, locked while running"),
    Option("allow_concurrent", _bool, "", "run even when another mailrelayd already relays a queue"),
    Option("metrics", _listen, "HOST:PORT", "serve Prometheus metrics on this address (default: off)"),
]
_BY_KEY = {o.key: o for o in OPTIONS}
assert set(_BY_KEY) == {f.name for f in fields(Config)} - {"queues"}
# Settings of the whole process, which a [[queue]] table cannot set.
PROCESS_KEYS = frozenset({"log_format", "log_level", "log_file", "syslog", "daemon", "pidfile",
                          "allow_concurrent", "metrics"})
DELIVERY_WAYS = ("command", "maildir", "smtp_server")


def read_toml(path: Path) -> dict[str, Any]:
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


def _build_one(file_values: dict[str, Any], flag_values: dict[str, Any], source: str,
               need_queue: bool = True) -> Config:
    values: dict[str, Any] = {}
    for origin, given in ((source or "config", file_values), ("flag", flag_values)):
        for key, raw in given.items():
            option = _BY_KEY.get(key)
            if option is None:
                raise ConfigError(f"{origin}: unknown key '{key}'")
            try:
                values[key] = option.parse(raw)
            except ValueError as e:
                shown = f"--{key.replace('_', '-')}" if origin == "flag" else key
                table = origin.partition(" [[queue]] ")[2]
                where = f" in [[queue]] {table}" if table and origin != "flag" else ""
                raise ConfigError(f"bad value for {shown}{where} ({raw!r}): {e}") from None
    ways = [k for k in DELIVERY_WAYS if k in values]
    if len(ways) > 1:  # a flag overrides the file's way to deliver; two of one kind conflict
        by_flag = [k for k in ways if k in flag_values]
        if len(by_flag) != 1:
            raise ConfigError(f"{' and '.join(ways)} are all given: choose one way to deliver")
        for k in ways:
            if k not in by_flag:
                del values[k]
    if ("db" in values and "spool" in values) or (need_queue and "db" not in values and "spool" not in values):
        raise ConfigError("give one queue: db (--db FILE) or spool (--spool DIR), or [[queue]] tables")
    config = Config(**values)
    if config.max_retry_delay < config.retry_delay:
        raise ConfigError("bad value for max_retry_delay: shorter than retry_delay")
    if config.spool and is_glob(config.spool) and config.state_dir:
        raise ConfigError("state_dir cannot be set for a spool glob: each spool keeps its state beside it")
    return config
