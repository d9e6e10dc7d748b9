"""The sd_notify client against real AF_UNIX datagram sockets the tests bind."""

from __future__ import annotations

import os
import socket
import time

import pytest

from mailrelayd.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path):
    """A bound datagram socket on a path; yields (socket, path)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def notifier(listener):
    n = Notifier.from_environment({"NOTIFY_SOCKET": listener[1]})
    yield n
    n.close()


def test_ready_with_status_arrives_byte_exact(listener, notifier):
    """READY=1 and STATUS= arrive as one datagram, exactly as sent."""
    assert notifier.ready("relaying /srv/fossil/emailqueue.db")
    assert listener[0].recv(4096) == b"READY=1\nSTATUS=relaying /srv/fossil/emailqueue.db"


def test_abstract_socket(tmp_path):
    """A NOTIFY_SOCKET starting with "@" names a socket in the abstract namespace."""
    name = f"mailrelayd-test-{os.getpid()}-{tmp_path.name}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.close()
    finally:
        sock.close()


def test_watchdog_interval_is_half_the_timeout(listener):
    """WATCHDOG_USEC=20000000 (20 s) means a ping every 10 s."""
    n = Notifier.from_environment({"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "20000000"})
    assert n.watchdog_interval == 10.0


def test_watchdog_for_our_pid_applies(listener):
    """WATCHDOG_PID equal to our pid keeps the watchdog."""
    environ = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(environ).watchdog_interval == 10.0


def test_watchdog_for_another_pid_is_ignored(listener):
    """WATCHDOG_PID naming another process disables the watchdog."""
    environ = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(environ).watchdog_interval is None


def test_no_watchdog_without_watchdog_usec(notifier):
    """Without WATCHDOG_USEC there is no watchdog interval."""
    assert notifier.watchdog_interval is None


def test_variables_are_removed_from_environ(listener):
    """The variables are taken out of the environment so that children do not inherit them."""
    environ = {"NOTIFY_SOCKET": listener[1], "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1", "PATH": "/bin"}
    Notifier.from_environment(environ)
    assert environ == {"PATH": "/bin"}


def test_without_notify_socket_everything_is_a_no_op():
    """Without NOTIFY_SOCKET the notifier is disabled and every call returns False."""
    n = Notifier.from_environment({})
    assert not n.enabled
    assert [n.ready("x"), n.status("x"), n.watchdog(), n.stopping(), n.reloading(), n.send("A=1")] == [False] * 6
    assert n.last_error is None
    n.close()


def test_unbound_socket_path_returns_false(tmp_path):
    """A socket path nobody listens on makes send return False and sets last_error."""
    n = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert n.enabled
    assert n.ready() is False
    assert isinstance(n.last_error, OSError)
    n.close()


def test_status_newlines_become_one_line(listener, notifier):
    """Status text with newlines is sent as a single STATUS= line."""
    assert notifier.status("3 queued\n1 deferred")
    assert listener[0].recv(4096) == b"STATUS=3 queued 1 deferred"


def test_stopping(listener, notifier):
    """stopping() sends STOPPING=1 with an optional status."""
    assert notifier.stopping("finishing 2 deliveries")
    assert listener[0].recv(4096) == b"STOPPING=1\nSTATUS=finishing 2 deliveries"


def test_reloading_carries_monotonic_usec(listener, notifier):
    """reloading() sends RELOADING=1 with the CLOCK_MONOTONIC time in microseconds."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    first, second = listener[0].recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) >= before


def test_socket_is_close_on_exec(listener, notifier):
    """The notification socket is not inherited by child processes."""
    notifier.watchdog()
    assert os.get_inheritable(notifier._sock.fileno()) is False
