"""structlog set-up: key=value lines on a terminal, JSON lines otherwise; or to a file
(re-opened by `reopen()` after logrotate) or to syslog.

Events are short snake_case names with key-value context. Message bodies and secrets
are never logged. Values may be text from a queue, which is hostile: every line is one
line whatever it holds. Key=value lines (console, syslog) show every control, separator
and bidi character, and bytes that were not UTF-8, as visible escapes
(mailrelayd.terminal.clean); JSON lines escape the controls themselves, and show bytes
that were not UTF-8 as `\\xff` too. Logging never raises into its caller: a line a sink
cannot write (disk full, syslog down) is counted, and the sink's next line is preceded
by one `log_lines_dropped` event with the count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import structlog

from mailrelayd.terminal import clean, escape_undecodable

SYSLOG_FACILITY_MAIL = 2
SYSLOG_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

_generation = 0  # bumped by each configure(): every Logger binds anew
_file_writer: _FileWriter | None = None
_syslog_writer: _SyslogWriter | None = None

Render = Callable[[Any, str, dict], str]


class _Writer:
    """A destination of log lines: renders each event for itself, writes it, and counts the
    lines it could not write (or render), to say how many before its next line."""

    def __init__(self, render: Render):
        self.render = render
        self.dropped = 0
        self._lock = threading.RLock()  # reentrant: reopen() may run in a signal handler

    def emit(self, level: str, event_dict: dict) -> None:
        with self._lock:
            try:
                if self.dropped:
                    notice = {"timestamp": event_dict.get("timestamp"), "level": "warning",
                              "event": "log_lines_dropped", "count": self.dropped}
                    self._write("warning", self.render(None, "warning", notice))
                    self.dropped = 0
                self._write(level, self.render(None, level, event_dict))
            except (OSError, ValueError, TypeError):  # cannot write (or a value cannot be shown): count it
                self.dropped += 1

    def _write(self, level: str, line: str) -> None:
        raise NotImplementedError


class _StreamWriter(_Writer):
    """Writes lines to a text stream (stderr), flushing each."""

    def __init__(self, render: Render, stream: TextIO):
        super().__init__(render)
        self.stream = stream

    def _write(self, level: str, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class _FileWriter(_Writer):
    """Appends lines to a file that `reopen()` can swap for a new one at the same path.
    Unbuffered: each line is one write(2), and one that fails leaves nothing behind to be
    written later (or to fail again at close)."""

    def __init__(self, render: Render, path: Path):
        super().__init__(render)
        self.path = path
        self._file = self._open()

    def _open(self) -> BinaryIO:
        return open(self.path, "ab", buffering=0)

    def _write(self, level: str, line: str) -> None:
        data = f"{line}\n".encode()
        while data:  # a regular file takes it all, but for a disk filling up in between
            data = data[self._file.write(data):]

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


class _SyslogWriter(_Writer):
    """Sends each line as "<PRI>mailrelayd[PID]: line" to a local syslog socket. A line
    that cannot be sent is counted; the next one connects again."""

    def __init__(self, render: Render, address: str):
        super().__init__(render)
        self.address = address
        self._sock: socket.socket | None = None

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

    def _write(self, level: str, line: str) -> None:
        pri = SYSLOG_FACILITY_MAIL * 8 + SYSLOG_SEVERITY.get(level, 6)
        data = f"<{pri}>mailrelayd[{os.getpid()}]: {line}".encode()
        try:
            if self._sock is None:
                self._sock = self._connect()
            if self._sock.type == socket.SOCK_STREAM:
                self._sock.sendall(data + b"\0")
            else:
                self._sock.send(data)
        except OSError:
            self._drop()
            raise

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
    """A structlog logger that hands each event, with the level (the method name), to every
    writer, which renders it its own way."""

    def __init__(self, writers: list[_Writer]):
        self._writers = writers

    def _emit(self, level: str, event_dict: dict) -> None:
        for writer in self._writers:
            writer.emit(level, event_dict)

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


def _shown(value: Any) -> Any:
    """`value` with bytes that were not UTF-8 shown as escapes, in lists and dicts too."""
    if isinstance(value, str):
        return value if value.isprintable() else escape_undecodable(value)
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    return value


def _render_json(logger, method_name, event_dict) -> str:
    """One JSON object, all ASCII (JSON escapes every control and non-ASCII character);
    bytes that were not UTF-8, which JSON cannot carry, shown as `\\xff`; other objects
    by their repr."""
    line = json.dumps(event_dict, default=repr)
    if "\\ud" in line:  # a surrogate, escaped: perhaps a lone one (else a pair, or that text)
        line = json.dumps(_shown(event_dict), default=repr)
    return line


def _key_value(render: Render) -> Render:
    """`render`, with every control, separator and bidi character in the line escaped."""
    def rendered(logger, method_name, event_dict) -> str:
        line = render(logger, method_name, event_dict)
        return line if line.isprintable() else clean(line)
    return rendered


_render_console = _key_value(structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"]))
_logfmt_level_first = structlog.processors.LogfmtRenderer(key_order=["level"])


@_key_value
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
    global _file_writer, _syslog_writer, _generation
    old = (_file_writer, _syslog_writer)
    if log_format == "auto":
        log_format = "console" if log_file is None and syslog_address is None and \
            (stream or sys.stderr).isatty() else "json"
    render = _render_json if log_format == "json" else _render_console
    file_writer = _FileWriter(render, log_file) if log_file is not None else None
    syslog_writer = _SyslogWriter(_render_syslog, syslog_address) if syslog_address is not None else None
    writers: list[_Writer] = [w for w in (file_writer, syslog_writer) if w is not None]
    if not writers:
        writers = [_StreamWriter(render, stream or sys.stderr)]
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    _to_sinks],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _SinkLogger(writers),
        cache_logger_on_first_use=False,
    )
    _file_writer, _syslog_writer = file_writer, syslog_writer
    _generation += 1
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


class Logger:
    """A logger bound to `context` that follows the configuration in force: a reload that
    changes the level, the format or the file applies to loggers made before it too."""

    __slots__ = ("_bound", "_context", "_generation")

    def __init__(self, context: dict):
        self._context, self._bound, self._generation = context, None, -1

    def _logger(self):
        if self._generation != _generation:
            self._bound, self._generation = structlog.get_logger().bind(**self._context), _generation
        return self._bound

    def debug(self, event: str, **kw) -> None:
        self._logger().debug(event, **kw)

    def info(self, event: str, **kw) -> None:
        self._logger().info(event, **kw)

    def warning(self, event: str, **kw) -> None:
        self._logger().warning(event, **kw)

    def error(self, event: str, **kw) -> None:
        self._logger().error(event, **kw)

    def critical(self, event: str, **kw) -> None:
        self._logger().critical(event, **kw)


def get_logger(**context) -> Logger:
    return Logger(context)
