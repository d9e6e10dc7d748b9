"""Wake relays when a queue's files change: one inotify Observer (watchdog) for them all.

Events only wake a relay's loop; nothing is delivered on the watcher's threads. Where no
events can be had (a missing directory, a file system without inotify, no watches left),
a relay still finds new mail by polling. watchdog runs one reader thread per watched
directory besides the Observer's own.

A file renamed into a directory from outside it (`mailrelayd retry --failed`, `mv`) is
reported as moved, never as created, and a change of a file's metadata alone (chmod,
chown) as attrib, never as modified: a spool takes a created or modified file for one
still being written.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import watchdog.events
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver

_WAKING_EVENTS = (FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent)
# watchdog 4.0 and later report a change of metadata as FileAttribEvent; older ones (Debian
# 12 has 2.2.1) as FileModifiedEvent, told from a write by the file's times (_metadata_only)
# and passed on as "attrib". It still wakes the relay: the guess can be wrong for a file
# written and then chmod-ed or chown-ed (as SQLite does to its -wal when run as root).
_ATTRIB_APART = hasattr(watchdog.events, "FileAttribEvent")


def _not_the_stop_race(record: logging.LogRecord) -> bool:
    """watchdog logs this error when a watch is removed while an event is being read (a
    relay stopping at a reload): harmless, and not worth a line on stderr."""
    return "called when the thread is inactive" not in str(record.msg)


logging.getLogger("watchdog.observers.inotify").addFilter(_not_the_stop_race)


class _Handler(FileSystemEventHandler):
    def __init__(self, notice: Callable[[str, str], bool], wake: Callable[[], None]):
        self._notice = notice
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not isinstance(event, _WAKING_EVENTS):  # watchdog before 4.0 cannot filter (see schedule)
            return
        path = event.dest_path if isinstance(event, FileMovedEvent) else event.src_path  # a move: where it went
        if not path:  # moved out of the directory
            return
        path, kind = os.fsdecode(path), event.event_type
        if kind == "modified" and not _ATTRIB_APART and _metadata_only(path):
            kind = "attrib"
        if self._notice(kind, path):
            self._wake()


def _metadata_only(path: str) -> bool:
    """Whether the file's last change was to its metadata alone: a write sets its change and
    modification times alike, a chmod or chown moves the change time only."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False  # gone: nothing to tell
    return st.st_ctime_ns != st.st_mtime_ns


class Watch:
    """One directory watched for one relay; `stop()` ends it."""

    def __init__(self, watcher: Watcher, directory: Path, notice: Callable[[str, str], bool],
                 wake: Callable[[], None]):
        self.directory = directory
        self._watcher = watcher
        self._handler = _Handler(notice, wake)
        self._watch = None

    @property
    def running(self) -> bool:
        return self._watch is not None

    def start(self) -> str | None:
        """Start watching; None on success, else why events are unavailable (try again later)."""
        if self._watch is not None:
            return None
        if not self.directory.is_dir():
            return f"{self.directory}: no such directory"
        try:
            self._watch = self._watcher.schedule(self._handler, self.directory)
        except OSError as e:
            return f"{self.directory}: {e.strerror or e}"
        return None

    def stop(self) -> None:
        if self._watch is not None:
            self._watcher.unschedule(self._watch)
            self._watch = None


class Watcher:
    """The one Observer of a process, started with its first watch, stopped by `close()`."""

    def __init__(self):
        self._observer: BaseObserver | None = None
        self._lock = threading.Lock()

    def watch(self, directory: Path, notice: Callable[[str, str], bool], wake: Callable[[], None]) -> Watch:
        """A watch of `directory` that tells `notice(kind, path)` of every file created,
        written, closed after writing or moved in, and calls `wake()` when it answers True."""
        return Watch(self, directory, notice, wake)

    def schedule(self, handler: FileSystemEventHandler, directory: Path):
        with self._lock:
            if self._observer is None:
                self._observer = InotifyObserver(generate_full_events=True)  # unmatched moves in stay moves
                self._observer.start()
            try:  # watchdog 4.0 and later asks inotify for these events only
                return self._observer.schedule(  # type: ignore[call-arg]
                    handler, str(directory), event_filter=list(_WAKING_EVENTS))
            except TypeError:  # older ones (Debian 12 has 2.2.1) send every event: _Handler filters
                return self._observer.schedule(handler, str(directory))

    def unschedule(self, watch) -> None:
        with self._lock:
            if self._observer is not None:
                try:
                    self._observer.unschedule(watch)
                except KeyError:  # already gone with its directory
                    pass

    def close(self) -> None:
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
