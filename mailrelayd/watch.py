"""Wake the relay when a queue's files change (inotify through watchdog).

Events only wake the relay's loop; nothing is delivered on the watcher's thread. Where
no events can be had (a missing directory, a file system without inotify, no watches
left), the relay still finds new mail by polling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

_WAKING_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent]


def _not_the_stop_race(record: logging.LogRecord) -> bool:
    """watchdog logs this error when an observer stops while an event is being read (a
    relay stopping at a reload): harmless, and not worth a line on stderr."""
    return "called when the thread is inactive" not in str(record.msg)


logging.getLogger("watchdog.observers.inotify").addFilter(_not_the_stop_race)


class _Handler(FileSystemEventHandler):
    def __init__(self, notice: Callable[[str, str], bool], wake: Callable[[], None]):
        self._notice = notice
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = getattr(event, "dest_path", "") or event.src_path  # a move: where it went
        if self._notice(event.event_type, os.fsdecode(path)):
            self._wake()


class DirectoryWatcher:
    """Tells `notice(kind, path)` of every file in `directory` created, written, closed
    after writing or moved in, and calls `wake()` when it answers True."""

    def __init__(self, directory: Path, notice: Callable[[str, str], bool], wake: Callable[[], None]):
        self.directory = directory
        self._handler = _Handler(notice, wake)
        self._observer = None

    @property
    def running(self) -> bool:
        return self._observer is not None

    def start(self) -> str | None:
        """Start watching; return None on success, else why events are unavailable."""
        if self._observer is not None:
            return None
        if not self.directory.is_dir():
            return f"{self.directory}: no such directory"
        observer = Observer()
        try:
            observer.schedule(self._handler, str(self.directory), event_filter=_WAKING_EVENTS)
            observer.start()
        except OSError as e:
            return f"{self.directory}: {e.strerror or e}"
        self._observer = observer
        return None

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
