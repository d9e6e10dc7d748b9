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

import os
import re
import signal
import subprocess
import tempfile
from contextlib import ExitStack

from mailrelayd.deadlines import Deadlines
from mailrelayd.inject import write_all
from mailrelayd.message import Envelope, to_lf
from mailrelayd.outcome import Outcome, PermanentFailure, Sent, TemporaryFailure
from mailrelayd.utf8_headers import encode_headers

# sysexits.h names by status (64 EX_USAGE ... 78 EX_CONFIG), for the error a log shows.
SYSEXITS = {getattr(os, name): name for name in dir(os) if name.startswith("EX_") and 64 <= getattr(os, name) <= 78}


class PipeTransport:
    """Runs `command` (plus `-f SENDER` when the envelope has one) once per message; with
    `encode_utf8`, header text that is not ASCII goes as encoded-words (utf8_headers.py)."""

    def __init__(self, command: tuple[str, ...], timeout: float, permanent_exit_codes: frozenset[int],
                 encode_utf8: bool = True):
        self.command = command
        self.timeout = timeout
        self.permanent_exit_codes = permanent_exit_codes
        self.encode_utf8 = encode_utf8
        self._deadlines = Deadlines("pipe-deadlines")

    def deliver(self, data: bytes, envelope: Envelope) -> Outcome:
        argv = [*self.command, *(["-f", envelope.sender] if envelope.sender else [])]
        if envelope.explicit:  # recipients as arguments, not from the header
            if any(r.startswith("-") for r in envelope.recipients):
                return PermanentFailure("a recipient starts with '-'")
            argv = [*_without_header_recipients(argv), *envelope.recipients]
        with ExitStack() as fds:
            message, output = (_memory_fd(name, fds) for name in ("mailrelayd-message", "mailrelayd-output"))
            write_all(message, to_lf(encode_headers(data) if self.encode_utf8 else data))
            os.lseek(message, 0, os.SEEK_SET)
            try:
                proc = subprocess.Popen(argv, stdin=message, stdout=output, stderr=output, start_new_session=True)
            except OSError as e:
                return TemporaryFailure(f"cannot run {argv[0]}: {e.strerror or e}", setup_error=True)
            with proc, self._deadlines.watch(self.timeout, lambda: _kill_group(proc.pid)) as watch:
                proc.wait()
            said = os.pread(output, 4096, max(0, os.lseek(output, 0, os.SEEK_END) - 4096))
        if watch.fired and proc.returncode != 0:  # with what it said: postdrop's "Permission denied"
            return TemporaryFailure(f"{argv[0]} timed out after {self.timeout:g} s and was killed"
                                    + _colon(_last_lines(said)))
        return self._outcome(argv[0], proc.returncode, said)

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


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
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


def _memory_fd(name: str, fds: ExitStack) -> int:
    """An anonymous read-write file (a descriptor, closed on exec, and closed by `fds`)
    that never touches the disk if it can help it. Plain descriptors: a file object per
    delivery costs the relay."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:
        fd, path = tempfile.mkstemp(prefix=name)
        os.unlink(path)
    fds.callback(os.close, fd)
    return fd


def _last_lines(output: bytes, count: int = 3) -> str:
    """The program's last few lines of output: msmtp, for one, puts the server's reply
    before its closing 'could not send mail'."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-500:]


def _colon(said: str) -> str:
    return f": {said}" if said else ""
