"""The daemon as a service manager runs it: a long-lived process woken by files and signals."""

import signal
import sqlite3
import subprocess
import time

from mailrelayd.message import to_lf
from mailrelayd.queues import owner_token
from conftest import fossil_message, started_calls, wait_until


def test_inserted_message_reaches_sendmail_promptly(sqlite_harness, fake_sendmail, daemon):
    """Each message Fossil inserts while the daemon waits (polling only hourly) is handed to sendmail within seconds."""
    d = daemon(*sqlite_harness.cli_args, "--poll-interval", "1h")
    wait_until(lambda: d.logged("relay_started"), timeout=10, what="the daemon to start")
    # One connection kept open, as `fossil alerts send` keeps it while it queues alert after alert.
    fossil = sqlite3.connect(sqlite_harness.path, timeout=1.0, isolation_level=None)
    try:
        for n in range(5):
            d.wait_idle(quiet=0.2)
            data = fossil_message(subject=f"alert {n}")
            fossil.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (data,))
            wait_until(lambda: to_lf(data) in fake_sendmail.bodies(), timeout=3, what=f"alert {n} to be handed over")
            wait_until(lambda: sqlite_harness.queued() == 0, timeout=3, what=f"alert {n} to be recorded")
    finally:
        fossil.close()
    assert d.alive()


def test_sigterm_lets_the_delivery_in_flight_finish(queue_harness, fake_sendmail, daemon):
    """SIGTERM during a delivery: the daemon waits for sendmail, records the message as sent and exits 0."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.take_seconds(2)
    d = daemon(*queue_harness.cli_args, "--poll-interval", "1h")
    wait_until(lambda: started_calls(fake_sendmail), timeout=10, what="the delivery to start")
    assert fake_sendmail.calls() == []
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=15) == 0
    assert len(fake_sendmail.calls()) == 1
    assert queue_harness.queued() == 0


def test_sigusr1_makes_the_daemon_scan(sqlite_harness, fake_sendmail, daemon):
    """SIGUSR1 scans the queue at once, finding what no file event announced (a claim whose owner died)."""
    data = fossil_message(subject="held by another relay")
    emailid = sqlite_harness.enqueue(data)
    sqlite_harness.open_queue().close()
    holder = subprocess.Popen(["sleep", "3600"])  # stands in for a live relay holding the claim
    try:
        now = time.time()
        with sqlite3.connect(sqlite_harness.path) as conn:
            conn.execute(
                "INSERT INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, owner, lease_until)"
                " VALUES (?, 0, ?, ?, ?, ?)", (emailid, now, now, owner_token(holder.pid), now + 7200))
        d = daemon(*sqlite_harness.cli_args, "--poll-interval", "1h")
        wait_until(lambda: d.logged("relay_started"), timeout=10, what="the daemon to start")
        d.wait_idle()
        assert started_calls(fake_sendmail) == []
    finally:
        holder.kill()
        holder.wait()
    # The claim is now stale, but nothing touched the file: only a scan can notice.
    try:
        d.proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        pass
    assert started_calls(fake_sendmail) == [] and d.alive()
    d.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: fake_sendmail.bodies() == [to_lf(data)], timeout=5, what="the delivery after SIGUSR1")
    wait_until(lambda: sqlite_harness.queued() == 0, timeout=5, what="the message to be recorded")
    assert d.alive()


def test_missing_database_is_reported_and_awaited(tmp_path, fake_sendmail, daemon):
    """Started before Fossil's queue file exists, the daemon logs an error naming it, keeps running, and delivers once Fossil creates it."""
    path = tmp_path / "emailqueue.db"
    d = daemon("--db", str(path), "--poll-interval", "30s")
    [error] = wait_until(lambda: d.logged("queue_unavailable"), timeout=10, what="the error")
    assert error["level"] == "error" and str(path) in error["error"]
    assert d.alive()

    data = fossil_message(subject="first alert")
    fossil = sqlite3.connect(path, timeout=1.0, isolation_level=None)  # what Fossil does, step by step
    try:
        fossil.execute("CREATE TABLE IF NOT EXISTS email(emailid INTEGER PRIMARY KEY, msg TEXT)")
        fossil.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (data,))
    finally:
        fossil.close()
    wait_until(lambda: fake_sendmail.bodies() == [to_lf(data)], timeout=5, what="the delivery")
    assert d.alive()


def test_temporary_failure_is_retried_later_without_spinning(queue_harness, fake_sendmail, daemon):
    """EX_TEMPFAIL leaves the message queued with attempts=1 and next try --retry-delay on, and the daemon then sits nearly idle."""
    queue_harness.enqueue(fossil_message())
    fake_sendmail.exit_with(75, "try again later")
    d = daemon(*queue_harness.cli_args, "--poll-interval", "0.2s", "--retry-delay", "60s")
    [(attempts, next_try, last_error)] = wait_until(queue_harness.deferred, timeout=10,
                                                    what="the failure to be recorded")
    assert attempts == 1 and 50 <= next_try - time.time() <= 66 and "try again later" in last_error
    assert queue_harness.queued() == 1

    cpu_before, wakes_before = d.cpu_seconds(), d.main_thread_switches()
    time.sleep(2)  # the measurement window: polling every 0.2 s means about 10 wake-ups
    used, wakes = d.cpu_seconds() - cpu_before, d.main_thread_switches() - wakes_before
    assert used < 0.1 and wakes < 40, f"{used:.2f} s of CPU and {wakes} wake-ups in 2 s while idle"
    assert len(fake_sendmail.calls()) == 1 and d.alive()
