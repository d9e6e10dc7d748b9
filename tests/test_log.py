"""Logging to a stream, to a file (re-opened after logrotate) and to syslog; text from a queue in every
sink; the daemon under syslog with text that is not UTF-8."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TERMINAL_UNSAFE, allow_root, fossil_message, hostile_text, kill_fakes
from hypothesis import HealthCheck, given, settings

from mailrelayd import log


@pytest.fixture(autouse=True)
def reset_logging():
    yield
    log.configure("json")  # back to stderr, closing any file or socket


def test_file_gets_one_json_line_per_event(tmp_path):
    path = tmp_path / "mailrelayd.log"
    log.configure(log_file=path)
    log.get_logger(queue="q").info("message_sent", emailid=17)
    log.get_logger().debug("hidden")
    log.get_logger().error("queue_error", error="boom")
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert first["event"] == "message_sent" and first["level"] == "info"
    assert first["queue"] == "q" and first["emailid"] == 17 and first["timestamp"].endswith("Z")
    assert second == {"event": "queue_error", "level": "error", "error": "boom", "timestamp": second["timestamp"]}


def test_console_format_to_a_file_is_logfmt(tmp_path):
    path = tmp_path / "mailrelayd.log"
    log.configure("console", log_file=path)
    log.get_logger().info("relay_started", workers=4)
    assert path.read_text().startswith("timestamp=")
    assert path.read_text().endswith(" level=info event=relay_started workers=4\n")


def test_file_that_cannot_be_opened_raises(tmp_path):
    with pytest.raises(OSError):
        log.configure(log_file=tmp_path / "missing" / "mailrelayd.log")


def test_reopen_after_rename_writes_to_a_new_file(tmp_path):
    path, rotated = tmp_path / "mailrelayd.log", tmp_path / "mailrelayd.log.1"
    log.configure(log_file=path)
    logger = log.get_logger()
    logger.info("before")
    path.rename(rotated)
    logger.info("still_old")  # until reopen, lines go to the renamed file
    assert log.reopen() is None
    logger.info("after")
    log.get_logger().info("after_too")
    assert [json.loads(line)["event"] for line in rotated.read_text().splitlines()] == ["before", "still_old"]
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["after", "after_too"]


def test_reopen_failure_keeps_the_old_file(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "mailrelayd.log"
    log.configure(log_file=path)
    old = os.open(path, os.O_RDONLY)  # the file lives on while open
    try:
        path.unlink()
        directory.rmdir()
        error = log.reopen()
        assert isinstance(error, OSError)
        log.get_logger().info("after_failed_reopen")
        assert b"after_failed_reopen" in os.read(old, 4096)
    finally:
        os.close(old)


def test_reopen_without_a_file_does_nothing():
    log.configure("json")
    assert log.reopen() is None


@pytest.fixture
def syslog_socket(tmp_path):
    path = tmp_path / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_syslog_priority_and_format(syslog_socket):
    path, sock = syslog_socket
    log.configure("json", "info", syslog_address=str(path))
    log.get_logger(queue="q").info("message_sent", emailid=3)
    log.get_logger().error("queue_error", error="disk full")
    prefix = f"mailrelayd[{os.getpid()}]: "
    assert sock.recv(4096).decode() == f"<22>{prefix}message_sent level=info queue=q emailid=3"
    assert sock.recv(4096).decode() == f'<19>{prefix}queue_error level=error error="disk full"'


def test_syslog_reconnects_after_syslog_comes_back_and_counts_what_it_dropped(tmp_path):
    """Lines logged while syslog is down are counted, and the count is the first line once it is back."""
    path = tmp_path / "log"
    log.configure(syslog_address=str(path))
    log.get_logger().info("dropped")  # nobody listening: no error
    log.get_logger().critical("dropped_too")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        log.get_logger().warning("delivered")
        assert sock.recv(4096).decode() == f"<20>mailrelayd[{os.getpid()}]: log_lines_dropped level=warning count=2"
        assert sock.recv(4096).decode() == f"<20>mailrelayd[{os.getpid()}]: delivered level=warning"
        log.get_logger().info("next")
        assert sock.recv(4096).decode() == f"<22>mailrelayd[{os.getpid()}]: next level=info"


def test_syslog_stream_socket(tmp_path):
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(5)
        log.configure(syslog_address=str(path))
        log.get_logger().info("over_stream")
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(4096) == f"<22>mailrelayd[{os.getpid()}]: over_stream level=info\0".encode()


def test_file_and_syslog_together(tmp_path, syslog_socket):
    path, sock = syslog_socket
    log.configure(log_file=tmp_path / "mailrelayd.log", syslog_address=str(path))
    log.get_logger().warning("message_deferred", emailid=4)
    assert sock.recv(4096).decode() == f"<20>mailrelayd[{os.getpid()}]: message_deferred level=warning emailid=4"
    line = json.loads((tmp_path / "mailrelayd.log").read_text())
    assert line["event"] == "message_deferred" and line["emailid"] == 4 and "timestamp" in line


def test_log_fds(tmp_path, syslog_socket):
    path, sock = syslog_socket
    log.configure(log_file=tmp_path / "mailrelayd.log", syslog_address=str(path))
    fds = log.log_fds()
    assert len(fds) == 2
    assert os.path.samestat(os.fstat(fds[0]), (tmp_path / "mailrelayd.log").stat())
    log.configure("json")
    assert log.log_fds() == []


def test_stream_unchanged():
    stream = io.StringIO()
    log.configure("auto", "info", stream)  # not a terminal: JSON
    log.get_logger().info("relay_started", workers=2)
    assert json.loads(stream.getvalue())["workers"] == 2


# -- text from a queue ------------------------------------------------------------------------


def _visible_surrogates(text: str) -> str:
    """`text` with each lone surrogate shown as the escape the logs use (\\xff for a byte)."""
    return re.sub("[\ud800-\udfff]", lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}" if "\udc80" <= m[0] <= "\udcff"
                  else f"\\u{ord(m[0]):04x}", text)


class Sink:
    """A configured log destination, and what was written to it since the last `take()`."""

    def __init__(self, kind: str, tmp_path):
        self.kind, self.json = kind, kind.startswith("json")
        self._path, self._offset, self._sock, self._stream = tmp_path / "out.log", 0, None, None
        log_format = "json" if self.json else "console"
        if kind == "syslog":
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(str(tmp_path / "log"))
            self._sock.settimeout(5)
            log.configure(syslog_address=str(tmp_path / "log"))
        elif kind.endswith("file"):
            log.configure(log_format, log_file=self._path)
        else:  # a stream that takes only UTF-8, as stderr redirected to a file would
            self._stream = open(self._path, "w", encoding="utf-8")
            log.configure(log_format, stream=self._stream)

    def take(self) -> str:
        if self._sock is not None:
            line = self._sock.recv(65536).decode()  # strict: the datagram is UTF-8
            return line.split(": ", 1)[1] + "\n"
        with open(self._path, encoding="utf-8") as f:  # strict: the file is UTF-8
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        return text

    def close(self) -> None:
        for thing in (self._sock, self._stream):
            if thing is not None:
                thing.close()


@pytest.fixture(params=["console stream", "json stream", "console file", "json file", "syslog"])
def sink(request, tmp_path):
    found = Sink(request.param, tmp_path)
    yield found
    log.configure("json")
    found.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile_text())
def test_every_sink_writes_any_text_escaped_on_one_line(sink, text):
    """Any text is written by every sink as one line, never raised or dropped: JSON that parses back (bytes that
    were not UTF-8 shown as \\xNN), or key=value with every dangerous character escaped."""
    log.get_logger(queue=text).info("message_sent", emailid=text, to=[text, "b@example.org"], subject=text, n=1)
    written = sink.take()
    assert written.endswith("\n") and written.count("\n") == 1, repr(written)
    line = written[:-1]
    if sink.json:
        event = json.loads(line)
        assert event["subject"] == event["queue"] == event["emailid"] == _visible_surrogates(text)
        assert event["to"] == [_visible_surrogates(text), "b@example.org"] and event["n"] == 1
    else:
        assert not TERMINAL_UNSAFE.search(line), repr(line)
        assert line.endswith(" n=1")


def test_console_shows_escape_sequences_and_bytes_as_visible_escapes(tmp_path):
    """An OSC 52 sequence, CR and U+2028 in a Subject, and a non-UTF-8 spool name, reach the console escaped."""
    stream = io.StringIO()
    log.configure("console", stream=stream)
    log.get_logger().warning("message_deferred", emailid="bad\udcffname", subject="\x1b]52;c;aGk=\x07\rA\u2028\u202eB")
    assert stream.getvalue().endswith(' level=warning event=message_deferred emailid=bad\\xffname'
                                      ' subject="\\x1b]52;c;aGk=\\x07\\x0dA\\u2028\\u202eB"\n')


def test_file_that_cannot_be_written_counts_the_lines_and_says_so_once_it_can(tmp_path):
    """Lines a full disk refused are counted, never raised; after the file is reopened the count comes first."""
    path = tmp_path / "mailrelayd.log"
    path.symlink_to("/dev/full")  # every write fails: ENOSPC
    log.configure(log_file=path)
    for n in range(3):
        log.get_logger().info("message_sent", emailid=n)
    path.unlink()
    assert log.reopen() is None
    log.get_logger().info("message_sent", emailid=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e.get("count"), e.get("emailid")) for e in lines] == [
        ("log_lines_dropped", 3, None), ("message_sent", None, 3)]
    assert lines[0]["level"] == "warning" and lines[0]["timestamp"].endswith("Z")


def test_stream_that_cannot_be_written_never_raises(tmp_path):
    """A log stream that fails every write (stderr on a full disk) never raises into the caller."""
    full = open("/dev/full", "w")
    log.configure("console", stream=full)
    log.get_logger().error("queue_error", error="boom")
    log.get_logger().info("message_sent", subject="\udcff")
    log.configure("json")
    with contextlib.suppress(OSError):  # what is still buffered cannot be written either
        full.close()


# -- the daemon under syslog --------------------------------------------------------------------

# Run a command with a /dev/log of the test's own: in a private mount namespace, /dev is overlaid
# (its devices stay usable) and the test's socket is bound over /dev/log, so that the daemon's
# `--syslog` writes to it. Needs root (mount namespaces); the host's /dev is untouched.
WITH_DEV_LOG = """set -e
mount -t overlay overlay -o "lowerdir=/dev,upperdir=$2/upper,workdir=$2/work" /dev
touch /dev/log
mount --bind "$1" /dev/log
shift 2
exec "$@"
"""


@pytest.fixture
def dev_log(tmp_path):
    """(socket, command prefix): commands run with the prefix send their syslog lines to the socket."""
    overlay = tmp_path / "dev-overlay"
    (overlay / "upper").mkdir(parents=True)
    (overlay / "work").mkdir()
    path = tmp_path / "dev-log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", WITH_DEV_LOG, "sh", str(path),
                  str(overlay)]
        probe = subprocess.run([*prefix, "sh", "-c", "test -S /dev/log"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot give a process a /dev/log of its own (needs root): {probe.stderr!r}")
        yield sock, prefix


def _syslog_lines(sock, until, timeout: float = 15.0) -> list[str]:
    """The lines received (the syslog prefix taken off) until `until(lines)` holds; fail after `timeout` s."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(lines):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout} s; got {lines}")
        sock.settimeout(left)
        with contextlib.suppress(TimeoutError):
            lines.append(sock.recv(65536).decode().split(": ", 1)[1])  # strict: every datagram is UTF-8
    return lines


def _count(lines: list[str], event: str) -> int:
    return sum(line.startswith(event + " ") for line in lines)


def test_daemon_under_syslog_relays_on_past_names_and_recipients_that_are_not_utf8(spool_harness, fake_sendmail,
                                                                                  dev_log, tmp_path):
    """Under syslog, a spool name and a To: with bytes that are not UTF-8 and ESC are set aside with a notice and
    logged escaped, and the daemon relays on."""
    sock, prefix = dev_log
    fake_sendmail.exit_with(67, say="no \x1b[31mway")  # permanent: each message is set aside, with a notice
    spool = os.fsencode(spool_harness.path)
    with open(os.path.join(spool, b"bad\xffname\x1b[2J.email"), "wb") as f:
        f.write(fossil_message(subject="\x1b]52;c;aGk=\x07\rA\u2028\u202eB"))
    with open(os.path.join(spool, b"to.email"), "wb") as f:  # set aside unsent: not a plain address
        f.write(fossil_message(to="b\u00ffob@example.com, \x1bx@example.com").replace("\u00ff".encode(), b"\xff"))
    stderr = tmp_path / "daemon.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "mailrelayd",
                                 *allow_root(["--syslog", *spool_harness.cli_args, "--settle", "0",
                                              "--notify-failed", "admin@example.org",
                                              "--command", f"{fake_sendmail.path} -ti"])],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        # the two messages and their two notices are set aside; a notice is never sent about a notice
        lines = _syslog_lines(sock, lambda lines: _count(lines, "message_failed") >= 4)
        assert _count(lines, "notice_queued") == 2
        fake_sendmail.exit_with(0)
        spool_harness.enqueue(fossil_message(subject="after them"))
        lines += _syslog_lines(sock, lambda lines: _count(lines, "message_sent") == 1)
        assert proc.poll() is None, stderr.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        kill_fakes(fake_sendmail)
    assert not [line for line in lines if TERMINAL_UNSAFE.search(line)]
    failed = [line for line in lines if line.startswith("message_failed")]
    assert any("emailid=bad\\xffname\\x1b[2J.email" in line and 'subject="\\x1b]52;c;aGk=\\x07 A \\u202eB"' in line
               and "no \\x1b[31mway" in line for line in failed)
    assert any("emailid=to.email" in line and "not a plain address" in line for line in failed)
    notices = [data for data in fake_sendmail.bodies() if b"X-Mailrelayd-Notice" in data]
    assert len(notices) == 2 and not [data for data in notices if b"\x1b" in data]
    assert [data.decode().count("Message:    bad\\xffname\\x1b[2J.email") for data in notices] in ([1, 0], [0, 1])
