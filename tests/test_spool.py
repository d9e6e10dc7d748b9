"""The spool directory queue's own rules, through the real `mailrelayd` command.

Every test plants real files in a real spool (as Fossil, mailrelayd-sendmail or a hostile
jail would), runs `mailrelayd --spool` as a process, and reads what the fake sendmail
received and what the state directory beside the spool holds.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, SpoolHarness, allow_root, fossil_message, run_cli, wait_until

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path) -> SpoolHarness:
    return SpoolHarness(tmp_path)


def drain(spool: SpoolHarness, fake, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`mailrelayd --drain --spool SPOOL --command 'FAKE -ti'`, JSON log on stderr."""
    return run_cli("--drain", "--spool", str(spool.path), "--command", f"{fake.path} -ti",
                   "--log-format", "json", *extra, timeout=timeout)


def log_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def call_dirs(fake) -> list[Path]:
    """Every run of the fake sendmail, finished or not, oldest first."""
    return sorted((fake.ctl / "calls").iterdir(), key=lambda d: d.stat().st_mtime_ns)


def call_started(call: Path) -> float:
    """When that run of the fake sendmail started (it writes argv first)."""
    return (call / "argv").stat().st_mtime


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def plant_old(path: Path) -> None:
    """Make an entry look long settled (without following a symlink)."""
    old = time.time() - 3600
    os.utime(path, (old, old), follow_symlinks=False)


def assert_refused(spool: SpoolHarness, name: str, *words: str) -> str:
    """NAME was moved, unread, to STATE/corrupt/NAME with a NAME.reason naming the problem."""
    corrupt = spool.state / "corrupt"
    assert name not in entries(spool.path)
    assert os.path.lexists(corrupt / name), entries(corrupt)
    reason = (corrupt / f"{name}.reason").read_text()
    for word in words:
        assert word in reason, reason
    return reason


class Daemon:
    """`python -m mailrelayd` without --drain, its JSON log in a file; SIGTERM stops it."""

    def __init__(self, log_path: Path, args: list[str]):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mailrelayd", *allow_root(["--log-format", "json", *args])],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=ENV)

    def logged(self, event: str) -> list[dict]:
        return [e for e in log_events(self.log_path.read_text()) if e.get("event") == event]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def daemon(tmp_path, fake_sendmail):
    """Start `mailrelayd --command 'FAKE -ti' ARGS` in the background; killed at teardown."""
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        d = Daemon(tmp_path / f"daemon{len(started)}.log", [*args, "--command", f"{fake_sendmail.path} -ti"])
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.wait()


# A writer that creates a spool file in place and fills it slowly, as a slow Fossil might:
# it opens the file (empty at first), writes the message from stdin in small chunks with
# a pause after each, and prints the time of its last write and the time after close.
WRITER = r"""
import sys, time
path, chunks, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
data = sys.stdin.buffer.read()
step = -(-len(data) // chunks)
with open(path, "wb", buffering=0) as f:
    time.sleep(pause)
    for i in range(0, len(data), step):
        f.write(data[i:i + step])
        last_write = time.time()
        time.sleep(pause)
print(last_write, time.time(), flush=True)
"""


def start_writer(path: Path, data: bytes, chunks: int, pause: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(chunks), str(pause)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(data)
    proc.stdin.close()
    return proc


def writer_times(writer: subprocess.Popen, timeout: float = 30) -> tuple[float, float]:
    """Wait for the writer; (time of its last write, time just after it closed the file)."""
    out = writer.stdout.read()
    assert writer.wait(timeout=timeout) == 0
    last_write, closed = map(float, out.split())
    return last_write, closed


def lf_message(subject: str = "Hello", to: str = "bob@example.com", body: str = "Body text.\n") -> bytes:
    return (f"To: {to}\nFrom: Fossil <noreply@example.org>\nSubject: {subject}\n"
            f"Date: Sun, 22 Nov 2026 03:41:57 +0000\n\n{body}").encode()


# -- hostile entries -------------------------------------------------------------------------


def test_symlink_to_secret_is_set_aside_unread(spool, fake_sendmail, tmp_path):
    """A symlink to a secret file goes to corrupt/ as a link, the secret is never mailed and stays intact."""
    secret = tmp_path / "shadow"
    secret_data = b"To: attacker@evil.example\nSubject: loot\n\nroot:$6$SECRET-HASH:19000:0:99999:7:::\n"
    secret.write_bytes(secret_data)
    secret.chmod(0o600)
    os.symlink(secret, spool.path / "202611220341570000662273.email")
    plant_old(spool.path / "202611220341570000662273.email")
    good = spool.enqueue(lf_message("legit"))
    plant_old(spool.path / good)

    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.bodies() == [lf_message("legit")]
    assert not any(b"SECRET-HASH" in data for _, data in fake_sendmail.calls())
    reason = assert_refused(spool, "202611220341570000662273.email", "symbolic link")
    assert "SECRET" not in reason
    assert os.readlink(spool.state / "corrupt" / "202611220341570000662273.email") == str(secret)
    st = os.lstat(secret)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and secret.read_bytes() == secret_data


def test_hard_link_to_outside_file_is_set_aside(spool, fake_sendmail, tmp_path):
    """A hard link (link count 2) to a file outside the spool goes to corrupt/, unmailed, both names kept."""
    outside = tmp_path / "outside-secret"
    outside_data = lf_message("private", body="OUTSIDE-ONLY\n")
    outside.write_bytes(outside_data)
    name = "202611220341570001000001.email"
    os.link(outside, spool.path / name)
    assert os.stat(outside).st_nlink == 2
    plant_old(spool.path / name)

    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.calls() == []
    assert_refused(spool, name, "hard link")
    assert outside.read_bytes() == outside_data
    assert os.stat(outside).st_nlink == 2
    assert os.path.samefile(outside, spool.state / "corrupt" / name)


def test_fifo_is_set_aside_without_hanging(spool, fake_sendmail):
    """A FIFO in the spool goes to corrupt/ without being opened: the drain does not hang on it."""
    name = "202611220341570002000002.email"
    os.mkfifo(spool.path / name)
    plant_old(spool.path / name)

    proc = drain(spool, fake_sendmail, "--settle", "0", timeout=15)

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.calls() == []
    assert_refused(spool, name, "FIFO")
    assert stat.S_ISFIFO(os.lstat(spool.state / "corrupt" / name).st_mode)


def test_directory_is_set_aside_with_its_content(spool, fake_sendmail):
    """A directory in the spool goes to corrupt/ whole, nothing inside it read, mailed or deleted."""
    name = "202611220341570003000003.email"
    (spool.path / name).mkdir()
    (spool.path / name / "inner.email").write_bytes(lf_message("inside a directory"))
    plant_old(spool.path / name)

    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.calls() == []
    assert_refused(spool, name, "directory")
    assert (spool.state / "corrupt" / name / "inner.email").read_bytes() == lf_message("inside a directory")


def test_file_over_max_size_is_set_aside(spool, fake_sendmail):
    """A file over --max-size goes to corrupt/ with its size in the reason, intact; smaller ones are sent."""
    big = lf_message("big", body="x" * 2000 + "\n")
    big_name = spool.enqueue(big)
    small_name = spool.enqueue(lf_message("small"))
    for name in (big_name, small_name):
        plant_old(spool.path / name)

    proc = drain(spool, fake_sendmail, "--settle", "0", "--max-size", "1K")

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.bodies() == [lf_message("small")]
    assert_refused(spool, big_name, str(len(big)), "max_size")
    assert (spool.state / "corrupt" / big_name).read_bytes() == big


def test_settled_empty_file_is_set_aside(spool, fake_sendmail):
    """An empty file that has settled goes to corrupt/ as an empty file, and nothing is mailed."""
    name = spool.enqueue(b"")
    plant_old(spool.path / name)

    proc = drain(spool, fake_sendmail, "--settle", "1s")

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.calls() == []
    assert_refused(spool, name, "empty")
    assert (spool.state / "corrupt" / name).stat().st_size == 0


def test_file_of_another_owner_is_set_aside(spool, fake_sendmail):
    """With --spool-owner root, a file owned by nobody goes to corrupt/ naming its uid; root's own are sent."""
    nobody = pwd.getpwnam("nobody").pw_uid
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    foreign = spool.enqueue(lf_message("from nobody"))
    own = spool.enqueue(lf_message("from root"))
    os.chown(spool.path / foreign, nobody, -1)
    for name in (foreign, own):
        plant_old(spool.path / name)

    proc = drain(spool, fake_sendmail, "--settle", "0", "--spool-owner", "root")

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.bodies() == [lf_message("from root")]
    assert_refused(spool, foreign, f"uid {nobody}")
    assert (spool.state / "corrupt" / foreign).stat().st_uid == nobody


# -- files still being written -----------------------------------------------------------------


def test_half_written_file_is_taken_on_close_not_before(spool, fake_sendmail, daemon):
    """A file written slowly while the daemon runs is sent once, whole, right after its writer closes it."""
    d = daemon("--spool", str(spool.path), "--settle", "2s", "--poll-interval", "1h")
    wait_until(lambda: d.logged("relay_started"), what="the daemon to start")
    message = lf_message("slow", body="".join(f"line {n} of a slowly written body\n" for n in range(40)))

    writer = start_writer(spool.path / "202611220341570004000004.email", message, chunks=20, pause=0.12)
    last_write, closed = writer_times(writer)
    wait_until(lambda: fake_sendmail.calls(), timeout=10, what="the delivery")
    wait_until(lambda: entries(spool.path) == [], timeout=5, what="the spool to empty")
    assert d.stop() == 0

    [call] = call_dirs(fake_sendmail)
    assert fake_sendmail.bodies() == [message]
    started = call_started(call)
    assert started >= last_write, "delivery began before the writer's last write"
    # Settling alone would wait until last_write + 2 s; the close event is far quicker.
    assert started - closed < 1.0, f"delivered {started - closed:.2f} s after close"


def test_drain_never_sends_a_file_still_being_written(spool, fake_sendmail):
    """Without file events, a drain waits while a writer keeps pausing for less than --settle, then sends the whole message once."""
    message = lf_message("slow drain", body="".join(f"line {n}\n" for n in range(30)))
    path = spool.path / "202611220341570005000005.email"
    writer = start_writer(path, message, chunks=12, pause=0.2)
    wait_until(path.exists, what="the writer to create its file")

    proc = drain(spool, fake_sendmail, "--settle", "1s")

    assert writer.poll() is not None, "the drain returned while the writer was still writing"
    last_write, _ = writer_times(writer)
    assert proc.returncode == 0, proc.stderr
    assert fake_sendmail.bodies() == [message]
    assert call_started(call_dirs(fake_sendmail)[0]) >= last_write + 1.0 - 0.05


def test_file_found_at_start_waits_for_settle(spool, fake_sendmail):
    """A drain finding a just-written file waits until it is --settle old, then sends it (it does not exit first)."""
    message = lf_message("just written")
    name = spool.enqueue(message)
    written = (spool.path / name).stat().st_mtime

    proc = drain(spool, fake_sendmail, "--settle", "1s")

    assert proc.returncode == 0, proc.stderr
    assert fake_sendmail.bodies() == [message]
    assert call_started(call_dirs(fake_sendmail)[0]) >= written + 1.0 - 0.05
    assert entries(spool.path) == []


# -- the layout --------------------------------------------------------------------------------


def test_temporary_failure_moves_message_to_deferred_with_state(spool, fake_sendmail):
    """Exit 75 moves the message to STATE/deferred/NAME with STATE/schedule/NAME (attempt 1, next try, error), leaving the spool empty."""
    message = fossil_message(subject="later")
    name = spool.enqueue(message)
    fake_sendmail.exit_with(75, "mail system busy")

    before = time.time()
    proc = drain(spool, fake_sendmail, "--settle", "0", "--retry-delay", "10m")

    assert proc.returncode == 75, proc.stderr
    assert entries(spool.path) == []
    assert entries(spool.state / "deferred") == [name] and entries(spool.state / "schedule") == [name]
    assert (spool.state / "deferred" / name).read_bytes() == message
    state = json.loads((spool.state / "schedule" / name).read_text())
    assert state["attempts"] == 1
    assert before + 540 <= state["next_try"] <= time.time() + 660  # 10 min, +-10 % jitter
    assert "exited 75" in state["last_error"] and "mail system busy" in state["last_error"]


def test_permanent_failure_moves_message_to_failed_with_reason(spool, fake_sendmail):
    """Exit 65 moves the message to STATE/failed/NAME with NAME.reason, and the drain exits 65."""
    message = fossil_message(subject="bounce")
    name = spool.enqueue(message)
    fake_sendmail.exit_with(65, "no such user")

    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 65, proc.stderr
    assert entries(spool.path) == []
    assert entries(spool.state / "failed") == [name, f"{name}.reason"]
    assert (spool.state / "failed" / name).read_bytes() == message
    reason = (spool.state / "failed" / f"{name}.reason").read_text()
    assert "exited 65" in reason and "no such user" in reason
    assert entries(spool.state / "deferred") == []


def test_keep_sent_keeps_sent_files(spool, fake_sendmail):
    """With --keep-sent a sent message is kept, unchanged, in STATE/sent/NAME."""
    message = fossil_message(subject="keep me")
    name = spool.enqueue(message)

    proc = drain(spool, fake_sendmail, "--settle", "0", "--keep-sent")

    assert proc.returncode == 0, proc.stderr
    assert len(fake_sendmail.calls()) == 1
    assert entries(spool.path) == []
    assert entries(spool.state / "sent") == [name]
    assert (spool.state / "sent" / name).read_bytes() == message


def test_sent_files_are_removed_without_keep_sent(spool, fake_sendmail):
    """Without --keep-sent a sent message leaves no file anywhere."""
    spool.enqueue(fossil_message(subject="forget me"))

    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 0, proc.stderr
    assert len(fake_sendmail.calls()) == 1
    assert entries(spool.path) == []
    for sub in ("sent", "deferred", "failed", "corrupt"):
        assert entries(spool.state / sub) == [], sub


def test_default_state_dir_is_beside_the_spool(spool, fake_sendmail):
    """Without --state-dir the state lives in SPOOL.mailrelayd beside the spool, never inside it."""
    spool.enqueue(fossil_message())
    fake_sendmail.exit_with(75)

    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 75, proc.stderr
    assert spool.state == spool.path.with_name("spool.mailrelayd")
    assert {"deferred", "failed", "corrupt", "sent"} <= set(entries(spool.state))
    assert len(entries(spool.state / "deferred")) == 1 and len(entries(spool.state / "schedule")) == 1
    assert entries(spool.path) == []


def test_deferred_message_named_like_a_state_file_is_kept(spool, fake_sendmail):
    """A deferred message whose spool name ends in .state is neither lost nor mistaken for a state file by the next drain."""
    message = lf_message("odd name")
    name = "alert.state"
    (spool.path / name).write_bytes(message)
    fake_sendmail.exit_with(75)
    assert drain(spool, fake_sendmail, "--settle", "0").returncode == 75

    proc = drain(spool, fake_sendmail, "--settle", "0")  # not due yet: maintenance only

    assert proc.returncode == 0, proc.stderr
    kept = [p for p in (spool.state / "deferred").iterdir() if p.read_bytes() == message]
    assert kept, f"the message is gone: deferred/ holds {entries(spool.state / 'deferred')}"


def test_failed_message_named_like_a_reason_file_is_not_overwritten(spool, fake_sendmail):
    """A failed message kept as failed/NAME.reason is not overwritten when a later message NAME fails too."""
    first = lf_message("first failure")
    (spool.path / "alert.reason").write_bytes(first)
    fake_sendmail.exit_with(65, "no such user")
    assert drain(spool, fake_sendmail, "--settle", "0").returncode == 65
    assert (spool.state / "failed" / "alert.reason").read_bytes() == first

    (spool.path / "alert").write_bytes(lf_message("second failure"))
    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 65, proc.stderr
    kept = [p for p in (spool.state / "failed").iterdir() if p.read_bytes() == first]
    assert kept, f"the first failed message is gone: failed/ holds {entries(spool.state / 'failed')}"


@pytest.fixture
def other_fs_dir(tmp_path):
    """A fresh directory name on /dev/shm, if that is another file system than tmp_path."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) to put the state on")
    path = shm / f"mailrelayd-test-{uuid.uuid4().hex}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_drain_refuses_state_dir_on_another_file_system(spool, fake_sendmail, other_fs_dir):
    """A --state-dir on another file system than the spool: one clear error line, exit 66, nothing sent or moved."""
    name = spool.enqueue(fossil_message())

    proc = drain(spool, fake_sendmail, "--settle", "0", "--state-dir", str(other_fs_dir))

    assert proc.returncode == 66, proc.stderr
    errors = [e for e in log_events(proc.stderr) if e["level"] in ("error", "critical")]
    assert len(errors) == 1, proc.stderr
    text = json.dumps(errors[0])
    assert str(other_fs_dir) in text and str(spool.path) in text and "file system" in text
    assert fake_sendmail.calls() == []
    assert entries(spool.path) == [name]


def test_daemon_refuses_state_dir_on_another_file_system(spool, fake_sendmail, other_fs_dir, daemon):
    """The daemon with a --state-dir on another file system exits 66 after one clear error, rather than running without relaying."""
    spool.enqueue(fossil_message())
    d = daemon("--spool", str(spool.path), "--settle", "0", "--state-dir", str(other_fs_dir))

    wait_until(lambda: d.logged("queue_unavailable"), what="the error")
    try:
        status = d.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        status = None
    assert status == 66, "the daemon kept running with an unusable state directory"
    assert fake_sendmail.calls() == []


# -- a missing spool -------------------------------------------------------------------------------


def test_drain_of_missing_spool_exits_66_naming_it(tmp_path, fake_sendmail):
    """--drain on a spool directory that does not exist exits 66 with an error naming it, creating nothing."""
    missing = tmp_path / "no-such-spool"

    proc = run_cli("--drain", "--spool", str(missing), "--command", f"{fake_sendmail.path} -ti",
                   "--log-format", "json")

    assert proc.returncode == 66, proc.stderr
    [error] = [e for e in log_events(proc.stderr) if e["level"] == "error"]
    assert str(missing) in error["error"]
    assert not missing.exists() and not tmp_path.joinpath("no-such-spool.mailrelayd").exists()


def test_daemon_waits_for_missing_spool_then_delivers(tmp_path, fake_sendmail, daemon):
    """The daemon started before its spool exists keeps running and delivers once the directory appears."""
    spool_path = tmp_path / "spool"
    d = daemon("--spool", str(spool_path), "--settle", "0.5s", "--poll-interval", "0.2s")
    [error] = wait_until(lambda: d.logged("queue_unavailable"), what="the error")
    assert str(spool_path) in error["error"]
    assert d.proc.poll() is None

    staging = tmp_path / "staging"
    staging.mkdir()
    message = lf_message("after the spool appeared")
    (staging / "202611220341570006000006.email").write_bytes(message)
    staging.rename(spool_path)

    wait_until(lambda: fake_sendmail.bodies() == [message], timeout=10, what="the delivery")
    wait_until(lambda: entries(spool_path) == [], timeout=5, what="the spool to empty")
    assert d.stop() == 0


# -- the injector's envelope -----------------------------------------------------------------------


def enqueue(spool: SpoolHarness, *args: str, message: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailrelayd", "enqueue", "--spool", str(spool.path), *args],
                          input=message, capture_output=True, timeout=30, env=ENV)


def test_injected_envelope_is_delivered_as_arguments(spool, fake_sendmail):
    """A message from `mailrelayd enqueue -i -f S A B` is piped unchanged (utf8_headers = keep) to `FAKE -i -f S A B`,
    without -t."""
    message = ("To: a@x.org\nFrom: Trac <trac@example.org>\nSubject: Ticket #7 caf\u00e9\n\n"
               "A body line.\n.\n..dots\nlast line\n").encode()
    result = enqueue(spool, "-i", "-f", "trac@example.org", "a@x.org", "hidden@x.org", message=message)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")

    proc = drain(spool, fake_sendmail, "--settle", "0", "--utf8-headers", "keep")

    assert proc.returncode == 0, proc.stderr
    [(argv, data)] = fake_sendmail.calls()
    assert argv == ["-i", "-f", "trac@example.org", "a@x.org", "hidden@x.org"]
    assert data == message
    assert entries(spool.path) == []


@pytest.mark.parametrize("preamble", [
    pytest.param(b"MAILRELAYD-ENVELOPE 1\nsender trac@example.org\n\n", id="no-recipient"),
    pytest.param(b"MAILRELAYD-ENVELOPE 1\nsender trac@example.org\nrecipient -oQ/tmp/evil\n\n", id="option-recipient"),
    pytest.param(b"MAILRELAYD-ENVELOPE 2\nsender trac@example.org\nrecipient a@x.org\n\n", id="unknown-version"),
    pytest.param(b"MAILRELAYD-ENVELOPE 1\nsender trac@example.org\nrecipient a@x.org\n", id="no-blank-line"),
])
def test_malformed_envelope_preamble_is_set_aside(spool, fake_sendmail, preamble):
    """A spool file with a malformed mailrelayd envelope preamble goes to corrupt/ with the reason, unsent."""
    data = preamble + b"To: a@x.org\nSubject: s\n\nbody\n"
    name = spool.enqueue(data)

    proc = drain(spool, fake_sendmail, "--settle", "0")

    assert proc.returncode == 65, proc.stderr  # entries refused, none deferred
    assert fake_sendmail.calls() == []
    assert_refused(spool, name, "envelope")
    assert (spool.state / "corrupt" / name).read_bytes() == data


# -- several relays ----------------------------------------------------------------------------------


def test_two_drains_deliver_each_of_100_messages_once(spool, fake_sendmail):
    """Two drains running at once on one spool of 100 messages share them, each message sent exactly once."""
    messages = [lf_message(f"message {n}") for n in range(100)]
    for message in messages:
        spool.enqueue(message)
    fake_sendmail.take_seconds(0.03)

    args = ["--drain", "--spool", str(spool.path), "--settle", "0", "--workers", "4", "--log-format", "json",
            "--command", f"{fake_sendmail.path} -ti"]
    procs = [subprocess.Popen([sys.executable, "-m", "mailrelayd", *allow_root(args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], outputs
    sent = [[e for e in log_events(err) if e["event"] == "drain_done"][0]["sent"] for _, err in outputs]
    assert sum(sent) == 100
    assert all(n > 0 for n in sent), f"the drains did not overlap: {sent}"
    assert sorted(fake_sendmail.bodies()) == sorted(messages)
    assert len(call_dirs(fake_sendmail)) == 100
    assert entries(spool.path) == []


def test_a_drain_that_only_refused_entries_exits_65_and_says_so(spool, fake_sendmail):
    """Refused entries are not "all sent": a drain that refused some and deferred none exits 65, and drain_done counts them."""
    (spool.path / "202611220341570000000001.email").write_bytes(b"")
    plant_old(spool.path / "202611220341570000000001.email")
    proc = drain(spool, fake_sendmail, "--settle", "0")
    assert proc.returncode == 65, proc.stderr
    [done] = [e for e in log_events(proc.stderr) if e["event"] == "drain_done"]
    assert (done["refused"], done["sent"]) == (1, 0)
