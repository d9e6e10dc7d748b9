"""structlog set-up: key=value lines on a terminal, JSON lines otherwise.

Events are short snake_case names with key-value context. Message bodies and secrets
are never logged.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import structlog


class _UtcTimestamp:
    """Adds `timestamp` in ISO 8601 UTC (2026-11-22T03:41:57.123456Z), formatting each
    second only once: a log line per delivered message makes this worth it."""

    def __init__(self):
        self._second, self._prefix = -1, ""

    def __call__(self, logger, method_name, event_dict):
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send log events to `stream` (stderr) as `log_format`: auto, console or json."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _UtcTimestamp(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context):
    return structlog.get_logger().bind(**context)
