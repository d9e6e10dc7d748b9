"""Logging to a file (re-opened after logrotate) and to syslog."""

from __future__ import annotations

import io
import json
import os
import socket

import pytest

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


def test_syslog_reconnects_after_syslog_comes_back(tmp_path):
    path = tmp_path / "log"
    log.configure(syslog_address=str(path))
    log.get_logger().info("dropped")  # nobody listening: no error
    log.get_logger().critical("dropped_too")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        log.get_logger().warning("delivered")
        assert sock.recv(4096).decode() == f"<20>mailrelayd[{os.getpid()}]: delivered level=warning"


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
