"""Relays side by side, deliveries side by side, and Fossil writing all the while."""

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from mailrelayd.message import to_lf
from conftest import ROOT, allow_root, fossil_message, run_cli, wait_until

FOSSIL_LIKE = Path(__file__).with_name("fossil_like.py")

DRAINS, WORKERS = 2, 2  # drains side by side, and the workers of each: many claims, many races


def start_drain(harness, fake_sendmail, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mailrelayd", *allow_root(["--drain", *harness.cli_args, "--command",
                                                           f"{fake_sendmail.path} -ti", "--log-format", "json",
                                                           *extra])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def drain(harness, fake_sendmail, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("--drain", *harness.cli_args, "--command", f"{fake_sendmail.path} -ti", *extra)


def enqueue_many(harness, messages: list[bytes]) -> None:
    for message in messages:
        harness.enqueue(message)


def drain_done(stderr: str) -> dict:
    [done] = [e for e in map(json.loads, stderr.splitlines()) if e.get("event") == "drain_done"]
    return done


SLOW_FOR_EARLY = r"""#!/bin/sh
# Takes 3 s over each message whose subject starts with "early", then hands it to the fake sendmail.
tmp=$(mktemp)
cat > "$tmp"
grep -q '^Subject: early' "$tmp" && sleep 3
"@FAKE@" "$@" < "$tmp"; status=$?
rm -f "$tmp"
exit $status
"""


class FossilWriter(threading.Thread):
    """Inserts a message every 10 ms as Fossil does: its own connection, a 1 s busy timeout, no retry after."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.inserted: list[bytes] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            data = fossil_message(to=f"sub{n}@example.com", subject=f"alert {n}")
            n += 1
            try:
                conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
                try:
                    conn.execute("CREATE TABLE IF NOT EXISTS email(emailid INTEGER PRIMARY KEY, msg TEXT)")
                    conn.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (data,))
                finally:
                    conn.close()
                self.inserted.append(data)
            except sqlite3.Error as e:
                self.failures.append(str(e))
            self.stopping.wait(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def test_two_drains_on_one_file_deliver_each_message_once(queue_harness, fake_sendmail):
    """Two drains started together on one file share 200 messages: each is delivered exactly once."""
    messages = [fossil_message(to=f"u{i}@example.com", subject=f"twin {i}") for i in range(200)]
    enqueue_many(queue_harness, messages)
    queue_harness.open_queue().close()  # as a first run leaves the file (test_first_open_... covers the first open)
    fake_sendmail.take_seconds(0.02)
    procs = [start_drain(queue_harness, fake_sendmail, "--workers", str(WORKERS)) for _ in range(DRAINS)]
    outputs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * DRAINS, outputs
    delivered = Counter(fake_sendmail.bodies())
    assert {body: n for body, n in delivered.items() if n > 1} == {}
    assert set(delivered) == {to_lf(m) for m in messages}
    assert queue_harness.queued() == 0
    assert sum(drain_done(out)["sent"] for out in outputs) == 200


@pytest.fixture
def cpu_load():
    """Two CPU-bound processes beside the test, as on a busy 2-core machine; killed after it."""
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(2)]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


def has_open(pid: int, path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_fossil_inserts_never_fail_while_sendmail_is_slow(sqlite_harness, fake_sendmail, tmp_path):
    """Fossil inserting every 10 ms never meets a lock held for 1 s while each delivery takes 3 s."""
    early = [fossil_message(to=f"early{i}@example.com", subject=f"early {i}") for i in range(4)]
    enqueue_many(sqlite_harness, early)
    sqlite_harness.open_queue().close()  # the file as any earlier run left it (WAL, our tables)
    slow = tmp_path / "slow-sendmail"
    slow.write_text(SLOW_FOR_EARLY.replace("@FAKE@", str(fake_sendmail.path)))
    slow.chmod(0o755)
    writer = FossilWriter(sqlite_harness.path)
    writer.start()
    proc = start_drain(sqlite_harness, fake_sendmail, "--workers", "2", "--command", f"{slow} -ti")
    try:
        wait_until(lambda: set(map(to_lf, early)) <= set(fake_sendmail.bodies()) or proc.poll() is not None,
                   timeout=30, what="the four slow deliveries")
    finally:
        writer.stop()
        proc.terminate()  # the rest goes faster into a Maildir, below
    _, log = proc.communicate(timeout=60)
    assert writer.failures == []
    assert len(writer.inserted) > 100, "the writer hardly ran"
    assert set(map(to_lf, early)) <= set(fake_sendmail.bodies()), log[-2000:]
    final = run_cli("--drain", *sqlite_harness.cli_args, "--maildir", str(tmp_path / "out"), "--workers", "4")
    assert final.returncode == 0, final.stderr
    maildir = {without_envelope(f.read_bytes()) for f in (tmp_path / "out" / "new").iterdir()}
    delivered = set(fake_sendmail.bodies()) | maildir
    assert delivered == {to_lf(m) for m in early + writer.inserted}
    assert sqlite_harness.queued() == 0


def test_four_workers_deliver_four_at_once(queue_harness, fake_sendmail):
    """With --workers 4, four deliveries run at the same time (each waits for the other three)."""
    enqueue_many(queue_harness, [fossil_message(to=f"u{i}@example.com") for i in range(4)])
    fake_sendmail.require_concurrency(4)
    result = drain(queue_harness, fake_sendmail, "--workers", "4")
    assert result.returncode == 0, result.stderr
    assert len(fake_sendmail.calls()) == 4 and queue_harness.queued() == 0


def test_one_worker_never_runs_two_deliveries_at_once(queue_harness, fake_sendmail):
    """With --workers 1, a delivery that needs a second one running alongside waits alone until killed and is deferred."""
    enqueue_many(queue_harness, [fossil_message(to=f"u{i}@example.com") for i in range(2)])
    fake_sendmail.require_concurrency(2)
    result = drain(queue_harness, fake_sendmail, "--workers", "1", "--timeout", "1s")
    # The first delivery waits alone and is killed after 1 s; the second meets the
    # first one's leftover arrival mark and is sent.
    assert result.returncode == 75, result.stderr
    assert len(fake_sendmail.calls()) == 1 and queue_harness.queued() == 1


def test_first_open_waits_out_a_fossil_insert_in_progress(sqlite_harness, fake_sendmail):
    """A drain opening Fossil's file for the first time (rollback journal, no tables of ours) waits while Fossil is mid-insert, rather than failing."""
    early, late = fossil_message(subject="queued before"), fossil_message(subject="being inserted")
    sqlite_harness.enqueue(early)
    fossil = sqlite3.connect(sqlite_harness.path, isolation_level=None)
    fossil.execute("BEGIN IMMEDIATE")  # Fossil's insert, not yet committed
    fossil.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (late,))
    try:
        proc = start_drain(sqlite_harness, fake_sendmail)
        wait_until(lambda: proc.poll() is not None or has_open(proc.pid, sqlite_harness.path),
                   timeout=10, what="the drain to open the file")
        try:
            proc.wait(timeout=0.5)  # Fossil's insert lasts half a second, well within any busy timeout
        except subprocess.TimeoutExpired:
            pass
    finally:
        fossil.execute("COMMIT")
        fossil.close()
    _, log = proc.communicate(timeout=30)
    assert proc.returncode == 0, log
    assert sorted(fake_sendmail.bodies()) == sorted([to_lf(early), to_lf(late)])
    assert sqlite_harness.queued() == 0


def without_envelope(maildir_file: bytes) -> bytes:
    """A --maildir file without the Return-Path:, X-Original-To: and Delivered-To: lines it starts with."""
    lines = maildir_file.splitlines(keepends=True)
    while lines and lines[0].startswith((b"Return-Path: ", b"X-Original-To: ", b"Delivered-To: ")):
        lines.pop(0)
    return b"".join(lines)


def has_table(path: Path, name: str) -> bool:
    if not path.exists():
        return False
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0] == 1


def maildir_subjects(maildir: Path) -> list[str]:
    found = []
    for f in (maildir / "new").iterdir():
        found += [line[len("Subject: "):] for line in f.read_text().splitlines() if line.startswith("Subject: ")]
    return found


def test_first_opens_never_make_fossil_wait_100_ms_under_load(tmp_path, cpu_load):
    """Under CPU load, drains opening files Fossil has just made while it inserts (as Fossil does, no busy handler) all exit 0, and no insert fails or sleeps 100 ms on them."""
    for n in range(3):
        queue = tmp_path / f"round{n}" / "emailqueue.db"
        queue.parent.mkdir()
        writer = subprocess.Popen([sys.executable, str(FOSSIL_LIKE), str(queue), "2"], stdout=subprocess.PIPE,
                                  text=True)
        wait_until(lambda: has_table(queue, "email"), what="Fossil to make its file")
        first = run_cli("--drain", "--db", str(queue), "--maildir", str(queue.parent / "out"))
        inserts = json.loads(writer.communicate(timeout=60)[0])
        assert first.returncode == 0, first.stderr
        assert inserts["failures"] == []
        assert inserts["max_busy_retries"] < 10, inserts["max_busy_retries"]
        rest = run_cli("--drain", "--db", str(queue), "--maildir", str(queue.parent / "out"))
        assert rest.returncode == 0, rest.stderr
        assert sorted(maildir_subjects(queue.parent / "out")) == sorted(inserts["inserted"])
