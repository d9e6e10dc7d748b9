"""structlog set-up: key=value lines on a terminal, JSON lines otherwise; or to a file
(re-opened by `reopen()` after logrotate) or to syslog.

Events are short snake_case names with key-value context. Message bodies and secrets
are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog

SYSLOG_FACILITY_MAIL = 2
SYSLOG_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

_file_writer: _FileWriter | None = None
_syslog_writer: _SyslogWriter | None = None


class _FileWriter:
    """Appends lines to a file that `reopen()` can swap for a new one at the same path."""

    def __init__(self, path: Path):
        self.path = path
        self._file = self._open()
        self._lock = threading.RLock()  # reentrant: reopen() may run in a signal handler

    def _open(self) -> TextIO:
        return open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, level: str, line: str) -> None:
        with self._lock:
            try:
                self._file.write(line + "\n")
            except (OSError, ValueError):  # disk full, or closed: drop the line
                pass

    def reopen(self) -> OSError | None:
        try:
            new = self._open()
        except OSError as e:
            return e
        with self._lock:
            old, self._file = self._file, new
        old.close()
        return None

    def fds(self) -> list[int]:
        with self._lock:
            return [self._file.fileno()]

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _SyslogWriter:
    """Sends each line as "<PRI>mailrelayd[PID]: line" to a local syslog socket. A line
    that cannot be sent is dropped; the next one connects again."""

    def __init__(self, address: str):
        self.address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(1.0)
            sock.connect(self.address)
        except OSError:  # perhaps a stream socket (as logging.handlers.SysLogHandler does)
            sock.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(1.0)
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
        return sock

    def write(self, level: str, line: str) -> None:
        pri = SYSLOG_FACILITY_MAIL * 8 + SYSLOG_SEVERITY.get(level, 6)
        data = f"<{pri}>mailrelayd[{os.getpid()}]: {line}".encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = self._connect()
                if self._sock.type == socket.SOCK_STREAM:
                    self._sock.sendall(data + b"\0")
                else:
                    self._sock.send(data)
            except OSError:
                self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def fds(self) -> list[int]:
        """The socket's descriptor, connecting first if need be ([] if syslog is down)."""
        with self._lock:
            if self._sock is None:
                with contextlib.suppress(OSError):
                    self._sock = self._connect()
            return [self._sock.fileno()] if self._sock is not None else []

    def close(self) -> None:
        with self._lock:
            self._drop()


class _SinkLogger:
    """A structlog logger that renders each event once per sink and hands the line, with
    the level (the method name), to that sink's `write(level, line)`."""

    def __init__(self, sinks):
        self._sinks = sinks

    def _emit(self, level: str, event_dict: dict) -> None:
        for render, writer in self._sinks:
            writer.write(level, render(None, level, event_dict))

    def debug(self, event_dict: dict) -> None:
        self._emit("debug", event_dict)

    def info(self, event_dict: dict) -> None:
        self._emit("info", event_dict)

    def warning(self, event_dict: dict) -> None:
        self._emit("warning", event_dict)

    def error(self, event_dict: dict) -> None:
        self._emit("error", event_dict)

    def critical(self, event_dict: dict) -> None:
        self._emit("critical", event_dict)

    msg = log = info
    warn = warning
    exception = error
    fatal = critical


def _to_sinks(logger, method_name, event_dict):
    """Last processor before a _SinkLogger: pass the event dict on, unrendered."""
    return (event_dict,), {}


def _renderer(log_format: str):
    if log_format == "json":
        return structlog.processors.JSONRenderer()
    return structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])


_logfmt_level_first = structlog.processors.LogfmtRenderer(key_order=["level"])


def _render_syslog(logger, method_name, event_dict) -> str:
    """`event level=... key=value ...`: syslog stamps the time itself."""
    rest = {k: v for k, v in event_dict.items() if k not in ("event", "timestamp")}
    return f"{event_dict['event']} {_logfmt_level_first(logger, method_name, rest)}".rstrip()


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None, *,
              log_file: Path | None = None, syslog_address: str | None = None) -> None:
    """Send log events to `log_file` (appended to) and/or to the syslog socket
    `syslog_address` (facility mail); with neither, to `stream` (stderr). `log_format`:
    auto, console (key=value) or json; auto means JSON, or console on a terminal. Syslog
    lines are always key=value. Raises OSError if `log_file` cannot be opened."""
    global _file_writer, _syslog_writer
    old = (_file_writer, _syslog_writer)
    file_writer = _FileWriter(log_file) if log_file is not None else None
    syslog_writer = _SyslogWriter(syslog_address) if syslog_address is not None else None
    processors: list = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    factory: Callable[..., Any]
    if file_writer or syslog_writer:
        sinks: list[tuple[Callable[..., str], _FileWriter | _SyslogWriter]] = []
        if file_writer:
            sinks.append((_renderer("json" if log_format == "auto" else log_format), file_writer))
        if syslog_writer:
            sinks.append((_render_syslog, syslog_writer))
        processors.append(_to_sinks)
        factory = lambda *args: _SinkLogger(sinks)  # noqa: E731
    else:
        stream = stream or sys.stderr
        if log_format == "auto":
            log_format = "console" if stream.isatty() else "json"
        processors.append(_renderer(log_format))
        factory = structlog.WriteLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _file_writer, _syslog_writer = file_writer, syslog_writer
    for writer in old:
        if writer is not None:
            writer.close()


def reopen() -> OSError | None:
    """Re-open the log file at its path (after logrotate moved it; on SIGHUP). On failure,
    logging goes on to the old file and the error is returned."""
    writer = _file_writer
    return writer.reopen() if writer is not None else None


def log_fds() -> list[int]:
    """The file descriptors logging uses (the file, the syslog socket), to keep open
    when daemonizing."""
    return [fd for writer in (_file_writer, _syslog_writer) if writer is not None for fd in writer.fds()]


def get_logger(**context):
    return structlog.get_logger().bind(**context)
