"""Spool files whose writer pauses with the file open: never sent before it is closed.

A writer here writes the first part of a message into the spool in place, as Fossil does,
and then holds the file open until the test lets it write the rest and close it. With file
events, a file seen being written waits for its close however long that takes; without
them (a drain, a daemon's start-up), a read lease, where the kernel grants one, proves
whether a writer still holds the file open.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, allow_root, wait_until
from test_spool import entries, lf_message, plant_old, spool  # noqa: F401  (spool is a fixture)

MESSAGE = lf_message("paused", body="".join(f"line {n} of the body\n" for n in range(20)))
HEAD, TAIL = MESSAGE[:60], MESSAGE[60:]  # the head ends inside the header: sent alone, it is truncated

# Writes argv[2]'s bytes to argv[1] (created in place), says "written", waits for a line on
# stdin, writes argv[3]'s bytes, closes the file and exits. argv[4], if given, is the uid
# the file is handed to right after it is created (as when Fossil runs as another user).
WRITER = r"""
import os, sys
path, head, tail = sys.argv[1], open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
with open(path, "wb", buffering=0) as f:
    if len(sys.argv) > 4:
        os.fchown(f.fileno(), int(sys.argv[4]), -1)
    f.write(head)
    print("written", flush=True)
    sys.stdin.readline()
    f.write(tail)
"""

NO_LEASE = ("setpriv", "--bounding-set=-lease", "--inh-caps=-lease")  # root without CAP_LEASE


class PausedWriter:
    """A writer holding `path` open with only the head of MESSAGE written, until `finish()`."""

    def __init__(self, path: Path, parts: Path, owner: int | None = None):
        (parts / "head").write_bytes(HEAD)
        (parts / "tail").write_bytes(TAIL)
        args = [str(path), str(parts / "head"), str(parts / "tail")] + ([str(owner)] if owner is not None else [])
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "written\n"

    def finish(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


@pytest.fixture
def paused_writer(tmp_path):
    started = []

    def start(path: Path, owner: int | None = None) -> PausedWriter:
        parts = tmp_path / f"parts{len(started)}"
        parts.mkdir()
        started.append(PausedWriter(path, parts, owner))
        return started[-1]

    yield start
    for writer in started:
        writer.proc.kill()
        writer.proc.wait()


def logged(log: Path, event: str) -> list[dict]:
    """The JSON log lines of `log` (written by a running process) with this event."""
    found = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if entry.get("event") == event:
            found.append(entry)
    return found


def leases_work(directory: Path) -> bool:
    """Whether this process gets a read lease on a file of its own in `directory`."""
    probe = directory / ".lease-probe"
    probe.write_bytes(b"")
    fd = os.open(probe, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def needs_root_without_lease():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv, to run the daemon where no lease can be had")
    return pwd.getpwnam("nobody").pw_uid


def needs_leases(directory: Path):
    if not leases_work(directory):
        pytest.skip(f"the kernel grants no read lease in {directory}")


def test_paused_writer_is_sent_whole_after_close_on_events_alone(spool, fake_sendmail, daemon, paused_writer):
    """With file events and no lease to be had, a file whose writer pauses far past --settle is sent once, whole, after it is closed."""
    nobody = needs_root_without_lease()
    d = daemon("--spool", str(spool.path), "--settle", "0.2s", "--poll-interval", "1h", prefix=NO_LEASE)
    wait_until(lambda: d.logged("relay_started"), what="the daemon to start")
    path = spool.path / "202611220341570004000004.email"

    writer = paused_writer(path, owner=nobody)
    written = path.stat().st_mtime
    wait_until(lambda: time.time() > written + 1.0, what="--settle to pass five times over")
    d.wait_idle()
    assert fake_sendmail.calls() == [], "sent while its writer still held it open"
    writer.finish()

    wait_until(lambda: fake_sendmail.calls(), what="the delivery")
    wait_until(lambda: entries(spool.path) == [], what="the spool to empty")
    assert fake_sendmail.bodies() == [MESSAGE]


def test_file_renamed_in_from_outside_is_taken_at_once(spool, fake_sendmail, daemon, tmp_path):
    """A whole file renamed into the spool from outside it (as `retry --failed` does) is sent at once, never taken for one still being written."""
    nobody = needs_root_without_lease()
    d = daemon("--spool", str(spool.path), "--settle", "1h", "--poll-interval", "1h", prefix=NO_LEASE)
    wait_until(lambda: d.logged("relay_started"), what="the daemon to start")
    outside = tmp_path / "202611220341570004000005.email"
    outside.write_bytes(MESSAGE)
    os.chown(outside, nobody, -1)

    os.rename(outside, spool.path / outside.name)

    wait_until(lambda: fake_sendmail.calls(), what="the delivery")
    assert fake_sendmail.bodies() == [MESSAGE]


def test_a_change_of_metadata_alone_is_not_taken_for_writing(spool, fake_sendmail, daemon):
    """With no lease to be had, a whole file that is only chmod-ed and chown-ed while the daemon watches is still sent once settled."""
    nobody = needs_root_without_lease()
    name = spool.enqueue(MESSAGE)
    d = daemon("--spool", str(spool.path), "--settle", "3s", "--poll-interval", "1h", prefix=NO_LEASE)
    wait_until(lambda: d.logged("relay_started"), what="the daemon to start")

    path = spool.path / name
    os.chmod(path, 0o600)
    os.chown(path, nobody, -1)

    wait_until(lambda: fake_sendmail.calls(), timeout=20, what="the delivery, once settled")
    assert fake_sendmail.bodies() == [MESSAGE]


def test_drain_waits_for_a_writer_holding_a_settled_file(spool, fake_sendmail, paused_writer, tmp_path):
    """Without file events, a drain does not send a settled file whose writer the kernel shows still holds it open, says so once, and sends it whole once closed."""
    needs_leases(spool.path)
    path = spool.path / "202611220341570004000006.email"
    writer = paused_writer(path)
    plant_old(path)
    log = tmp_path / "drain.log"

    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mailrelayd", *allow_root([
                                    "--drain", "--spool", str(spool.path), "--settle", "0.2s",
                                    "--command", f"{fake_sendmail.path} -ti", "--log-format", "json"])],
                                stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(lambda: logged(log, "message_waiting_for_writer") or proc.poll() is not None, timeout=30,
                   what="the drain to find the file held open")
        assert fake_sendmail.calls() == [], "sent while its writer still held it open"
    finally:
        writer.finish()

    assert proc.wait(timeout=90) == 0, log.read_text()
    assert [e["emailid"] for e in logged(log, "message_waiting_for_writer")] == [path.name]
    assert fake_sendmail.bodies() == [MESSAGE]
    assert entries(spool.path) == []


def test_daemon_start_waits_for_a_writer_holding_a_settled_file(spool, fake_sendmail, daemon, paused_writer):
    """A daemon starting beside a settled file whose writer the kernel shows still holds it open does not send it, and sends it whole once closed."""
    needs_leases(spool.path)
    path = spool.path / "202611220341570004000007.email"
    writer = paused_writer(path)
    plant_old(path)

    d = daemon("--spool", str(spool.path), "--settle", "0.2s", "--poll-interval", "1h")
    try:
        wait_until(lambda: d.logged("message_waiting_for_writer") or not d.alive(), timeout=30,
                   what="the daemon to find the file held open")
        assert fake_sendmail.calls() == [], "sent while its writer still held it open"
    finally:
        writer.finish()

    wait_until(lambda: fake_sendmail.calls(), what="the delivery")
    wait_until(lambda: entries(spool.path) == [], what="the spool to empty")
    assert fake_sendmail.bodies() == [MESSAGE]
    assert d.alive()
