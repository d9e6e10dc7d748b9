"""What the supervisor sleeps on: a pipe that other threads and every signal write to.

The kernel may deliver a signal to any thread of the process. Python then runs the handler
in the main thread, but only once that thread runs again, and a main thread asleep on a
lock or a queue does not, until its timeout. So the supervisor sleeps in poll() on a pipe
that the C-level signal handler writes a byte to (`signal.set_wakeup_fd`), whichever thread
caught the signal, and that relay threads write to when they have news.
"""

from __future__ import annotations

import os
import select
import signal


class Wakeup:
    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._read, select.POLLIN)

    def fds(self) -> list[int]:
        """The pipe's descriptors (to keep open across --daemon's detaching)."""
        return [self._read, self._write]

    def catch_signals(self) -> None:
        """Have every signal with a Python handler wake `wait` (call from the main thread)."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def ring(self) -> None:
        """Wake `wait` (from any thread; never blocks)."""
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:  # the pipe is full: a wake-up is pending already
            pass

    def wait(self, timeout: float) -> None:
        """Sleep until rung or a signal came, or `timeout` seconds passed."""
        if self._poll.poll(max(0, int(timeout * 1000 + 0.999))):
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass
