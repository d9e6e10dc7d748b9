"""The mail systems of `bench.py --real`, each a private instance on loopback.

`open_system(name, tmp, sink)` is a context manager yielding a `System` (started, and
stopped on exit), or raising `Unavailable` with the reason it cannot run here. The
instances are the ones the tests use (tests/mta.py: the private Postfix, msmtp's
configuration, the aiosmtpd sink) and bench/smtp.py's Postfix `smtp-sink`.

The systems, by the name `--real` takes, with their default message counts:
- sink (3,000): bench/sink.c, which reads the message and exits 0: the relay's own cost;
- slow (300): the same sink waiting 50 ms per message: a latency-bound mail system;
- postfix (300): a private Postfix's `sendmail -C DIR -ti`, relaying to smtp-sink;
- msmtp (300): `msmtp -t` to Postfix's smtp-sink;
- smtp (200): mailrelayd's `--smtp-server` to an aiosmtpd server that waits 100 ms before
  its reply to the message's DATA; the serial consumer and email-sender.tcl, which can only
  pipe, use `msmtp -t` pointed at the same server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import ROOT, message

MESSAGES = {"sink": 3000, "slow": 300, "postfix": 300, "msmtp": 300, "smtp": 200}
NAMES = tuple(MESSAGES)
SLOW_MS = 50
DATA_DELAY = 0.100


class Unavailable(Exception):
    """The system cannot run on this machine; the message says what is missing."""


@dataclass
class System:
    """A started mail system: how each consumer reaches it, and what it has received."""

    name: str
    label: str
    command: str | None  # for the serial consumer and email-sender.tcl (None: not comparable)
    relay: list[str]  # mailrelayd's delivery arguments
    describe: str
    env: dict[str, str] = field(default_factory=dict)
    received: Callable[[], int] | None = None  # messages the system has taken in so far
    settle: float = 0.0  # seconds to wait for `received` to catch up (Postfix forwards later)


def _mta():
    """tests/mta.py (it needs pytest and aiosmtpd: the project's test extras)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import mta
    except ImportError as e:
        raise Unavailable(f"{e.name} is missing (pip install -e '.[test]' into the venv running the bench)") from e
    finally:
        sys.path.pop(0)
    return mta


def _smtp_sink(tmp: Path, stack: ExitStack):
    """Postfix's smtp-sink (bench/smtp.py), stopped with the stack."""
    from smtp import SMTP_SINK, Sink

    if not os.access(SMTP_SINK, os.X_OK):
        raise Unavailable(f"{SMTP_SINK} is missing (apt-get install postfix)")
    sink = Sink(tmp)
    stack.callback(sink.stop)
    return sink


def _msmtp(tmp: Path, port: int, name: str) -> str:
    mta = _mta()
    if not mta.MSMTP:
        raise Unavailable("msmtp is not installed (apt-get install msmtp)")
    home = tmp / f"msmtp-{name}"
    home.mkdir(exist_ok=True)
    return f"{mta.MSMTP} -C {mta.write_msmtp_config(home / 'msmtprc', port)} -t"


@contextmanager
def open_system(name: str, tmp: Path, sink: str | None) -> Iterator[System]:
    with ExitStack() as stack:
        if name in ("sink", "slow"):
            if not sink:
                raise Unavailable("no C compiler to build bench/sink.c (apt-get install gcc)")
            command = f"{sink} -ti"
            if name == "sink":
                yield System(name, "C sink", command, ["--command", command], f"{command} (bench/sink.c)")
            else:
                yield System(name, f"{SLOW_MS} ms sink", command, ["--command", command],
                             f"{command} with SINK_DELAY_MS={SLOW_MS}", env={"SINK_DELAY_MS": str(SLOW_MS)})
        elif name == "postfix":
            mta = _mta()
            if not mta.POSTFIX or not os.access(mta.POSTFIX_SENDMAIL, os.X_OK):
                raise Unavailable("postfix is not installed (apt-get install postfix)")
            if os.geteuid() != 0:
                raise Unavailable("a private Postfix instance needs root (postfix start)")
            relayhost = _smtp_sink(tmp, stack)
            postfix = mta.PostfixInstance("127.0.0.1", relayhost.port)
            stack.callback(postfix.remove)
            stack.callback(postfix.stop)
            postfix.start()
            warm_up(postfix.sendmail, relayhost.wait_for)
            yield System(name, "Postfix", postfix.sendmail, ["--command", postfix.sendmail],
                         f"{postfix.sendmail} (a private Postfix relaying to smtp-sink)",
                         received=relayhost.messages, settle=60.0)
        elif name == "msmtp":
            server = _smtp_sink(tmp, stack)
            command = _msmtp(tmp, server.port, name)
            yield System(name, "msmtp", command, ["--command", command],
                         f"{command} (to Postfix's smtp-sink)", received=server.messages, settle=5.0)
        elif name == "smtp":
            server = slow_smtp_server(stack)
            try:
                command = _msmtp(tmp, server.port, name)
            except Unavailable:
                command = None
            yield System(name, f"SMTP {DATA_DELAY * 1000:g} ms", command,
                         ["--smtp-server", "127.0.0.1", "--smtp-port", str(server.port), "--use-tls", "none"],
                         f"--smtp-server to aiosmtpd waiting {DATA_DELAY * 1000:g} ms before its reply to DATA; "
                         f"serial and Tcl: {command or 'skipped, no msmtp'}",
                         received=lambda: len(server.received()), settle=5.0)
        else:
            raise ValueError(name)


def warm_up(command: str, wait_for: Callable[[int, float], int], count: int = 20) -> None:
    """Pipe `count` messages through a fresh Postfix and wait for them to come out, so that its
    daemons (pickup, cleanup, qmgr, smtp) run before the first measured run, as in a warm one."""
    for i in range(count):
        subprocess.run(shlex.split(command), input=message(i, "warm-up"), check=True, timeout=60)
    if wait_for(count, 60.0) < count:
        raise RuntimeError(f"Postfix did not relay {count} warm-up messages within 60 s")


def slow_smtp_server(stack: ExitStack):
    """tests/mta.py's aiosmtpd sink, answering each message DATA_DELAY seconds late."""
    mta = _mta()
    if importlib.util.find_spec("aiosmtpd") is None:
        raise Unavailable("aiosmtpd is missing (pip install -e '.[test]' into the venv running the bench)")

    class SlowSink(mta.SmtpSink):
        async def handle_DATA(self, server, session, envelope):
            await asyncio.sleep(DATA_DELAY)
            return await super().handle_DATA(server, session, envelope)

    server = SlowSink()
    server.start()
    stack.callback(server.stop)
    return server


def messages_for(name: str, given: int | None, quick: bool) -> int:
    """The message count of a system's runs: --messages, else --quick's, else its default."""
    return given or ((500 if name == "sink" else 60) if quick else MESSAGES[name])
