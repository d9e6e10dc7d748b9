"""The single-relay lock: a flock on QUEUE.mailrelayd.lock holding the relay's pid."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from mailrelayd.queuelock import QueueLock, holder_pid

CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# Takes the lock at argv[1], prints its pid, holds the lock until stdin closes.
HOLD = """
import os, sys
from pathlib import Path
from mailrelayd.queuelock import QueueLock
assert QueueLock(Path(sys.argv[1])).acquire() is None
print(os.getpid(), flush=True)
sys.stdin.read()
"""

# Takes the lock, forks as a daemon does, and exits; the child rewrites the pid, prints it
# and holds the lock until stdin closes, then releases it before its stdout closes.
HOLD_AFTER_FORK = """
import os, sys
from pathlib import Path
from mailrelayd.queuelock import QueueLock
lock = QueueLock(Path(sys.argv[1]))
assert lock.acquire() is None
if os.fork():
    os._exit(0)
lock.rewrite_pid()
print(os.getpid(), flush=True)
sys.stdin.read()
lock.release()
"""


@pytest.fixture
def lock_path(tmp_path) -> Path:
    return tmp_path / "emailqueue.db.mailrelayd.lock"


@pytest.fixture
def holder(lock_path):
    """A separate process holding the lock; yields its pid, and ends it after the test."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    yield int(proc.stdout.readline())
    proc.communicate("")


def fds_open_on(path: Path) -> int:
    """How many of this process's descriptors are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return count


def test_acquire_creates_the_file_with_our_pid(lock_path):
    """acquire takes a free lock, creating the file (0644 less the umask) with our pid and a newline."""
    umask = os.umask(0o022)
    os.umask(umask)
    lock = QueueLock(lock_path)
    assert lock.acquire() is None
    assert lock_path.read_text() == f"{os.getpid()}\n"
    assert lock_path.stat().st_mode & 0o777 == 0o644 & ~umask
    lock.release()


def test_acquire_replaces_a_stale_pid(lock_path):
    """A pid left by a relay that died is replaced, not appended to."""
    lock_path.write_text("999999999\n")
    lock = QueueLock(lock_path)
    assert lock.acquire() is None
    assert lock_path.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_second_lock_in_the_same_process_conflicts(lock_path):
    """flock belongs to the open file, so a second QueueLock on the same path, even here, is refused."""
    first = QueueLock(lock_path)
    assert first.acquire() is None
    assert QueueLock(lock_path).acquire() == os.getpid()
    first.release()


def test_acquire_returns_the_holder_pid_of_another_process(lock_path, holder):
    """While another process holds the lock, acquire returns that process's pid."""
    assert QueueLock(lock_path).acquire() == holder


def test_failed_acquire_keeps_nothing_open(lock_path, holder):
    """A refused acquire leaves no descriptor open on the lock file."""
    QueueLock(lock_path).acquire()
    assert fds_open_on(lock_path) == 0


def test_holder_pid_seen_from_another_process(lock_path):
    """holder_pid, run in another process, names this process while it holds the lock."""
    lock = QueueLock(lock_path)
    lock.acquire()
    probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path;"
                            " from mailrelayd.queuelock import holder_pid; print(holder_pid(Path(sys.argv[1])))",
                            str(lock_path)], capture_output=True, text=True, env=CHILD_ENV, check=True)
    lock.release()
    assert probe.stdout == f"{os.getpid()}\n"


def test_holder_pid_of_another_process(lock_path, holder):
    """holder_pid names the other process holding the lock."""
    assert holder_pid(lock_path) == holder


def test_holder_pid_none_when_the_file_is_free(lock_path):
    """A lock file nobody holds (a stale pid in it) has no holder."""
    lock_path.write_text("999999999\n")
    assert holder_pid(lock_path) is None


def test_holder_pid_none_when_the_file_is_missing(lock_path):
    """No lock file: no holder, and none is created."""
    assert holder_pid(lock_path) is None and not lock_path.exists()


def test_lock_dies_with_its_process(lock_path):
    """Once the holding process has exited, the lock is free and can be taken."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    proc.stdout.readline()
    proc.communicate("")
    assert holder_pid(lock_path) is None
    lock = QueueLock(lock_path)
    assert lock.acquire() is None
    lock.release()


def test_release_lets_another_acquire_and_keeps_the_file(lock_path):
    """After release another QueueLock takes the lock; the file is not deleted."""
    first = QueueLock(lock_path)
    first.acquire()
    first.release()
    assert lock_path.exists()
    second = QueueLock(lock_path)
    assert second.acquire() is None
    second.release()


def test_release_with_clear_empties_the_file(lock_path):
    """release(clear=True), as for a pidfile, leaves the file in place but empty."""
    lock = QueueLock(lock_path)
    lock.acquire()
    lock.release(clear=True)
    assert lock_path.read_text() == "" and holder_pid(lock_path) is None


def test_fileno_is_the_descriptor_holding_the_lock(lock_path):
    """fileno() names the open descriptor on the lock file, to keep across a daemon's detaching."""
    lock = QueueLock(lock_path)
    lock.acquire()
    assert os.readlink(f"/proc/self/fd/{lock.fileno()}") == str(lock_path)
    lock.release()


def test_rewrite_pid_after_fork_keeps_the_lock(lock_path):
    """A daemon's forked child keeps the lock after its parent exits, and rewrite_pid names the child."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FORK, str(lock_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    child = int(proc.stdout.readline())
    proc.wait()  # the parent has exited; the child still holds the lock
    try:
        assert child != proc.pid
        assert holder_pid(lock_path) == child and lock_path.read_text() == f"{child}\n"
    finally:
        proc.stdin.close()
        proc.stdout.read()  # end of file: the child has released the lock and exited
    assert holder_pid(lock_path) is None


def test_symlink_at_the_lock_path_is_not_followed(lock_path, tmp_path):
    """A symlink planted at the lock path is refused with OSError; its target is neither created nor written."""
    target = tmp_path / "target"
    lock_path.symlink_to(target)
    with pytest.raises(OSError):
        QueueLock(lock_path).acquire()
    assert not target.exists()


def test_symlink_to_an_existing_file_is_not_truncated(lock_path, tmp_path):
    """A symlink to an existing file is refused and the file keeps its content."""
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    lock_path.symlink_to(target)
    with pytest.raises(OSError):
        QueueLock(lock_path).acquire()
    assert target.read_text() == "keep me\n"
