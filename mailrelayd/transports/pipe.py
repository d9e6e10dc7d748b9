"""Deliver by piping the message into a sendmail-compatible command (`sendmail -ti`).

The command is run directly, never through a shell. Its exit status is read as
sysexits.h says; only the statuses listed as permanent mark the message undeliverable,
everything else (including a missing program) keeps it for another try.
"""

from __future__ import annotations

import os
import signal
import subprocess

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

    def deliver(self, data: bytes, envelope: Envelope) -> Outcome:
        argv = [*self.command, *(["-f", envelope.sender] if envelope.sender else [])]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            return TemporaryFailure(f"cannot run {argv[0]}: {e.strerror or e}", setup_error=True)
        with proc:
            try:
                output, _ = proc.communicate(to_lf(data), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                if proc.poll() is None:
                    _kill_group(proc)
                    return TemporaryFailure(f"{argv[0]} timed out after {self.timeout:g} s and was killed")
                output = b""  # it exited, but a child of its own still holds the pipe open
        return self._outcome(argv[0], proc.returncode, output)

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
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_lines(output: bytes, count: int = 3) -> str:
    """The program's last few lines of output: msmtp, for one, puts the server's reply
    before its closing 'could not send mail'."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-500:]


def _colon(said: str) -> str:
    return f": {said}" if said else ""
