"""structlog set-up: key=value lines on a terminal, JSON lines otherwise.

Events are short snake_case names with key-value context. Message bodies and secrets
are never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


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
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context):
    return structlog.get_logger().bind(**context)
