"""Deliver by piping the message into a sendmail-compatible command (`sendmail -ti`).

The command is run directly, never through a shell. Its exit status is read as
sysexits.h says; only the statuses listed as permanent mark the message undeliverable,
everything else (including a missing program) keeps it for another try.

The whole message is written to an anonymous memory file before the command starts,
and that file is its stdin: if mailrelayd dies mid-delivery, the command still reads
the complete message, never a truncated one it would take for the whole. Its output
goes to another such file, so there are no pipes to pump: the process is reaped with a
blocking wait. Timeouts are enforced by one shared thread that kills the process group
of a delivery past its deadline, rather than by polling each child.
"""

from __future__ import annotations

import heapq
import itertools
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager

from mailrelayd.message import Envelope, to_lf
from mailrelayd.outcome import Outcome, PermanentFailure, Sent, TemporaryFailure

SYSEXITS = {
    64: "EX_USAGE",
    65: "EX_DATAERR",
    66: "EX_NOINPUT",
    67: "EX_NOUSER",
    68: "EX_NOHOST",
    69: "EX_UNAVAILABLE",
    70: "EX_SOFTWARE",
    71: "EX_OSERR",
    72: "EX_OSFILE",
    73: "EX_CANTCREAT",
    74: "EX_IOERR",
    75: "EX_TEMPFAIL",
    76: "EX_PROTOCOL",
    77: "EX_NOPERM",
    78: "EX_CONFIG",
}


class PipeTransport:
    """Runs `command` (plus `-f SENDER` when the envelope has one) once per message."""

    def __init__(self, command: tuple[str, ...], timeout: float, permanent_exit_codes: frozenset[int]):
        self.command = command
        self.timeout = timeout
        self.permanent_exit_codes = permanent_exit_codes
        self._deadlines = _Deadlines()

    def deliver(self, data: bytes, envelope: Envelope) -> Outcome:
        argv = [*self.command, *(["-f", envelope.sender] if envelope.sender else [])]
        if envelope.explicit:  # recipients as arguments, not from the header
            if any(r.startswith("-") for r in envelope.recipients):
                return PermanentFailure("a recipient starts with '-'")
            argv = [*_without_header_recipients(argv), *envelope.recipients]
        with _memory_file("mailrelayd-message") as message, _memory_file("mailrelayd-output") as output:
            message.write(to_lf(data))
            message.seek(0)
            try:
                proc = subprocess.Popen(argv, stdin=message, stdout=output, stderr=output, start_new_session=True)
            except OSError as e:
                return TemporaryFailure(f"cannot run {argv[0]}: {e.strerror or e}", setup_error=True)
            with proc, self._deadlines.watch(proc.pid, self.timeout) as watch:
                proc.wait()
            if watch.fired and proc.returncode != 0:
                return TemporaryFailure(f"{argv[0]} timed out after {self.timeout:g} s and was killed")
            output.seek(max(0, output.seek(0, os.SEEK_END) - 4096))
            return self._outcome(argv[0], proc.returncode, output.read())

    def _outcome(self, program: str, status: int, output: bytes) -> Outcome:
        said = _last_lines(output)
        if status == 0:
            return Sent(said)
        if status < 0:
            return TemporaryFailure(f"{program} killed by {signal.Signals(-status).name}" + _colon(said))
        detail = f"{program} exited {status}" + (f" ({SYSEXITS[status]})" if status in SYSEXITS else "") + _colon(said)
        if status in self.permanent_exit_codes:
            return PermanentFailure(detail)
        return TemporaryFailure(detail, setup_error=status in (64, 78, 126, 127))

    def close(self) -> None:
        self._deadlines.stop()


class _Watch:
    __slots__ = ("deadline", "pgid", "fired")

    def __init__(self, deadline: float, pgid: int):
        self.deadline, self.pgid, self.fired = deadline, pgid, False


class _Deadlines:
    """One thread that SIGKILLs the process group of each delivery that outlives its deadline."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wakes_at = float("inf")  # when the thread will next look at the heap by itself

    @contextmanager
    def watch(self, pgid: int, seconds: float):
        entry = _Watch(time.monotonic() + seconds, pgid)
        with self._cond:
            while self._heap and self._heap[0][2].pgid == 0:  # finished deliveries
                heapq.heappop(self._heap)
            heapq.heappush(self._heap, (entry.deadline, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            if entry.deadline < self._wakes_at:
                self._cond.notify()
        try:
            yield entry
        finally:
            with self._cond:
                entry.pgid = 0  # done: never signal it (its process group id may be reused)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                while self._heap and self._heap[0][2].pgid == 0:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wakes_at = float("inf")
                    self._cond.wait()
                    continue
                deadline, _, entry = self._heap[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakes_at = deadline
                    self._cond.wait(remaining)
                    continue
                heapq.heappop(self._heap)
                try:
                    os.killpg(entry.pgid, signal.SIGKILL)
                    entry.fired = True
                except ProcessLookupError:
                    pass


def _without_header_recipients(argv: list[str]) -> list[str]:
    """`argv` without -t (also inside -ti or -it): the recipients are the arguments."""
    kept = []
    for arg in argv[1:]:
        if re.fullmatch(r"-[it]+", arg):
            arg = arg.replace("t", "")
        if arg != "-":
            kept.append(arg)
    return [argv[0], *kept]


def _memory_file(name: str):
    """An anonymous read-write file that never touches the disk if it can help it."""
    if hasattr(os, "memfd_create"):
        return open(os.memfd_create(name, os.MFD_CLOEXEC), "w+b")
    return tempfile.TemporaryFile()


def _last_lines(output: bytes, count: int = 3) -> str:
    """The program's last few lines of output: msmtp, for one, puts the server's reply
    before its closing 'could not send mail'."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-500:]


def _colon(said: str) -> str:
    return f": {said}" if said else ""
