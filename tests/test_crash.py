"""kill -9 at any instant loses nothing: at most the in-flight messages go out twice."""

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mailrelayd.message import to_lf
from conftest import ROOT, FakeSendmail, allow_root, fossil_message, run_cli, wait_until

ROUNDS, MESSAGES, WORKERS = 8, 40, 2
# A relay holds at most 2 x workers claims (running, or finished but not yet recorded):
# only those can go out twice when it is killed.
IN_FLIGHT = 2 * WORKERS

SLOW_READER = r"""#!/bin/sh
# A sendmail that takes the first 1,000 bytes, then reads the rest only once CTL/go exists.
ctl="@CTL@"
dd bs=1 count=1000 status=none > "$ctl/stdin.$$"
echo $$ > "$ctl/started"
while [ ! -e "$ctl/go" ]; do sleep 0.01; done
cat >> "$ctl/stdin.$$"
touch "$ctl/done.$$"
exit 0
"""


def start_drain(harness, fake_sendmail, *extra: str) -> subprocess.Popen:
    """`mailrelayd --drain` as a child we can kill -9 at will."""
    return subprocess.Popen(
        [sys.executable, "-m", "mailrelayd", *allow_root(["--drain", *harness.cli_args,
                                                           "--command", f"{fake_sendmail.path} -ti", *extra])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def started_calls(fake_sendmail) -> list[Path]:
    return list((fake_sendmail.ctl / "calls").iterdir())


def all_calls_finished(fake_sendmail) -> bool:
    """Every fake sendmail that was started has also finished (orphans included)."""
    return all((d / "done").exists() for d in started_calls(fake_sendmail))


def kill_fakes(fake_sendmail) -> None:
    """SIGKILL the fake sendmails still running (orphans of killed relays): each leads its own session."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(fake_sendmail.path).encode() in cmdline:
            try:
                os.killpg(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(autouse=True)
def no_orphans_left(fake_sendmail):
    yield
    kill_fakes(fake_sendmail)


def test_kill_9_at_random_moments_loses_nothing(queue_harness, fake_sendmail):
    """Drains killed -9 at random moments, then one full drain: every message went out, few twice."""
    rng = random.Random(20261122)
    fake_sendmail.take_seconds(0.05)
    messages = [fossil_message(to=f"u{i}@example.com", subject=f"crash {i}") for i in range(MESSAGES)]
    for data in messages:
        queue_harness.enqueue(data)

    kills = 0
    for _ in range(ROUNDS):
        target = len(fake_sendmail.calls()) + rng.randint(0, 8)
        proc = start_drain(queue_harness, fake_sendmail, "--workers", str(WORKERS))
        try:
            wait_until(lambda: len(fake_sendmail.calls()) >= target or proc.poll() is not None,
                       timeout=30, what=f"{target} deliveries")
        finally:
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait()
    assert kills >= ROUNDS // 2, "too few rounds were killed mid-drain to test anything"

    final = run_cli("--drain", *queue_harness.cli_args, "--command", f"{fake_sendmail.path} -ti",
                    "--workers", str(WORKERS))
    assert final.returncode == 0, final.stderr
    wait_until(lambda: all_calls_finished(fake_sendmail), timeout=10, what="orphaned sendmails to finish")

    # A drain killed between starting sendmail and writing to it hands sendmail an empty
    # message; a real `sendmail -t` refuses that (no recipients), so it is no delivery.
    delivered = Counter(body for body in fake_sendmail.bodies() if body)
    assert set(delivered) == {to_lf(m) for m in messages}
    assert queue_harness.queued() == 0
    assert queue_harness.deferred() == [] and queue_harness.failed() == []
    duplicates = sum(delivered.values()) - len(delivered)
    assert duplicates <= kills * IN_FLIGHT, f"{duplicates} duplicates after {kills} kills"


def test_claim_of_killed_drain_is_taken_back_at_once(queue_harness, fake_sendmail, tmp_path):
    """A message claimed by a drain killed -9 mid-delivery is sent by the next drain, without waiting for the lease."""
    data = fossil_message(subject="orphaned claim")
    queue_harness.enqueue(data)
    fake_sendmail.take_seconds(3600)
    proc = start_drain(queue_harness, fake_sendmail)
    try:
        wait_until(lambda: started_calls(fake_sendmail), timeout=10, what="the delivery to start")
    finally:
        proc.kill()
        proc.wait()
    fast = FakeSendmail(tmp_path / "fast-sendmail")
    result = run_cli("--drain", *queue_harness.cli_args, "--command", f"{fast.path} -ti", timeout=30)
    assert result.returncode == 0, result.stderr
    assert fast.bodies() == [to_lf(data)]
    assert queue_harness.queued() == 0


def test_kill_9_while_writing_to_sendmail_never_hands_it_a_truncated_message(queue_harness, tmp_path):
    """A drain killed -9 half-way through writing a message to sendmail's stdin must not leave sendmail a truncated copy."""
    ctl = tmp_path / "slow-reader"
    ctl.mkdir()
    program = ctl / "sendmail"
    program.write_text(SLOW_READER.replace("@CTL@", str(ctl)))
    program.chmod(0o755)
    line = "A long forum post, as Fossil sends it, one line after another.\r\n"
    data = fossil_message(subject="long post", body=line * 3000)  # about 200 KB, more than a pipe holds
    queue_harness.enqueue(data)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailrelayd", *allow_root(["--drain", *queue_harness.cli_args, "--command",
                                                           f"{program} -ti"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        pid = int(wait_until(lambda: (ctl / "started").exists() and (ctl / "started").read_text().strip(),
                             timeout=10, what="sendmail to read the headers"))
    finally:
        proc.kill()
        proc.wait()
        (ctl / "go").touch()
    wait_until(lambda: (ctl / f"done.{pid}").exists(), timeout=10, what="sendmail to finish")
    received, whole = len((ctl / f"stdin.{pid}").read_bytes()), len(to_lf(data))
    assert received == whole, f"sendmail was handed {received} of {whole} bytes, then end of input"
    assert queue_harness.queued() == 1
