"""The daemon as a service: sd_notify, the watchdog, one relay per queue, reloads, --daemon."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from mailrelayd.message import to_lf
from conftest import ROOT, SpoolHarness, SqliteHarness, allow_root, fossil_message, run_cli, started_calls, wait_until


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[dict[str, str]] = []

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def next(self, timeout: float = 10.0) -> dict[str, str] | None:
        """The next datagram as a dict of its assignments, or None after `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(fields)
        return fields

    def until(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.next(left)
            if got is not None and key in got:
                return got
        raise AssertionError(f"no {key} within {timeout} s; got {self.seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def test_ready_comes_after_the_queue_is_open_and_stopping_on_sigterm(sqlite_harness, daemon, notify_socket):
    """READY=1 arrives once the relay has opened its queue, STATUS= counts it, and SIGTERM sends STOPPING=1 then exits 0."""
    sqlite_harness.enqueue(fossil_message())
    d = daemon(*sqlite_harness.cli_args, env=notify_socket.env())
    ready = notify_socket.until("READY")
    assert d.logged("relay_started"), "READY=1 came before the queue was open"
    assert "1 queue" in ready["STATUS"]
    d.proc.send_signal(signal.SIGTERM)
    notify_socket.until("STOPPING")
    assert d.proc.wait(timeout=15) == 0


def test_sigterm_caught_by_another_thread_stops_the_daemon_at_once(sqlite_harness, daemon):
    """A SIGTERM the kernel hands to a relay's thread, not the main one, still wakes the supervisor, which sleeps up to 15 s."""
    d = daemon(*sqlite_harness.cli_args, "--poll-interval", "1h")
    wait_until(lambda: d.logged("relay_started"), timeout=10, what="the relay to start")
    others = [int(tid) for tid in os.listdir(f"/proc/{d.pid}/task") if int(tid) != d.pid]
    os.kill(others[0], signal.SIGTERM)  # kill() with a thread's id offers the signal to that thread first
    assert d.proc.wait(timeout=8) == 0


def test_watchdog_is_pinged_while_the_loop_turns(sqlite_harness, daemon, notify_socket):
    """With WATCHDOG_USEC set, WATCHDOG=1 arrives about every half interval while all is well."""
    d = daemon(*sqlite_harness.cli_args, "--poll-interval", "1h", env=notify_socket.env(watchdog_usec=1_000_000))
    notify_socket.until("READY")
    for _ in range(3):
        notify_socket.until("WATCHDOG", timeout=3)
    assert d.alive() and not d.logged("queue_stalled")


def test_a_stalled_queue_is_reported_and_the_watchdog_still_pinged(sqlite_harness, fake_sendmail, daemon,
                                                                  notify_socket):
    """A relay stuck behind another process's write lock is reported as queue_stalled while WATCHDOG=1 keeps coming (one queue's trouble never restarts the others), and recovers when the lock goes."""
    sqlite_harness.enqueue(fossil_message())
    fake_sendmail.take_seconds(1)
    d = daemon(*sqlite_harness.cli_args, "--poll-interval", "1h", env=notify_socket.env(watchdog_usec=1_000_000))
    wait_until(lambda: started_calls(fake_sendmail), timeout=10, what="the delivery to start")
    blocker = sqlite3.connect(sqlite_harness.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # recording the outcome now waits (up to 5 s) for this lock
    try:
        wait_until(lambda: d.logged("queue_stalled"), timeout=10, what="the stall to be noticed")
        while notify_socket.next(timeout=0) is not None:  # what was sent before the stall
            pass
        for _ in range(3):
            notify_socket.until("WATCHDOG", timeout=3)
        assert d.logged("queue_stalled")[0]["queue"] == str(sqlite_harness.path)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: d.logged("queue_recovered"), timeout=10, what="the recovery to be noticed")
    wait_until(lambda: sqlite_harness.queued() == 0, timeout=10, what="the outcome to be recorded")


def test_second_daemon_on_a_queue_names_the_holder_and_exits_75(queue_harness, daemon):
    """A second daemon for the same queue says which pid relays it and exits 75, instead of fighting over it."""
    first = daemon(*queue_harness.cli_args)
    wait_until(lambda: first.logged("relay_started"), timeout=10, what="the first daemon to start")
    second = run_cli(*queue_harness.cli_args, "--command", "/bin/true", timeout=30)
    assert second.returncode == 75
    assert f"pid {first.pid}" in second.stderr and "--allow-concurrent" in second.stderr
    assert first.alive()


def test_allow_concurrent_runs_beside_a_holder(queue_harness, daemon):
    """With --allow-concurrent a second daemon starts relaying the held queue."""
    first = daemon(*queue_harness.cli_args)
    wait_until(lambda: first.logged("relay_started"), timeout=10, what="the first daemon to start")
    second = daemon(*queue_harness.cli_args, "--allow-concurrent")
    wait_until(lambda: second.logged("relay_started"), timeout=10, what="the second daemon to start")
    assert first.alive() and second.alive()


def test_drain_runs_beside_a_daemon(queue_harness, fake_sendmail, daemon):
    """A one-shot --drain still runs while a daemon holds the queue, and nothing is sent twice."""
    d = daemon(*queue_harness.cli_args, "--poll-interval", "1h")
    wait_until(lambda: d.logged("relay_started"), timeout=10, what="the daemon to start")
    for n in range(20):
        queue_harness.enqueue(fossil_message(subject=f"m{n}"))
    drained = run_cli("--drain", *queue_harness.cli_args, "--command", f"{fake_sendmail.path} -ti", "--settle", "0")
    assert drained.returncode == 0, drained.stderr
    wait_until(lambda: queue_harness.queued() == 0, timeout=20, what="every message to be sent")
    bodies = fake_sendmail.bodies()
    assert len(bodies) == len(set(bodies)) == 20


def test_status_names_the_daemon_relaying_the_queue(queue_harness, daemon):
    """`status --json` gives the running daemon's pid as relay_pid."""
    d = daemon(*queue_harness.cli_args)
    wait_until(lambda: d.logged("relay_started"), timeout=10, what="the daemon to start")
    status = run_cli("status", "--json", *queue_harness.cli_args)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["relay_pid"] == d.pid


# -- reload --------------------------------------------------------------------------------


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sighup_with_a_bad_config_keeps_the_old_one(sqlite_harness, fake_sendmail, daemon, tmp_path):
    """SIGHUP with a broken config file logs config_reload_failed and keeps relaying with the old settings."""
    config = write_config(tmp_path / "relay.toml", f'db = "{sqlite_harness.path}"\n')
    d = daemon("--config", str(config))
    wait_until(lambda: d.logged("relay_started"), timeout=10, what="the daemon to start")
    config.write_text('db = "unterminated\n')
    d.proc.send_signal(signal.SIGHUP)
    [failed] = wait_until(lambda: d.logged("config_reload_failed"), timeout=10, what="the refusal")
    assert "TOML" in failed["error"]
    data = fossil_message(subject="after a failed reload")
    sqlite_harness.enqueue(data)
    wait_until(lambda: to_lf(data) in fake_sendmail.bodies(), timeout=10, what="delivery with the old config")
    assert d.alive()


def test_sighup_applies_a_new_config(sqlite_harness, fake_sendmail, daemon, tmp_path):
    """SIGHUP with a changed envelope_from restarts the queue's relay with it, logging config_reloaded."""
    config = write_config(tmp_path / "relay.toml", f'db = "{sqlite_harness.path}"\n')
    d = daemon("--config", str(config), "--poll-interval", "1h")
    wait_until(lambda: d.logged("relay_started"), timeout=10, what="the daemon to start")
    config.write_text(f'db = "{sqlite_harness.path}"\nenvelope_from = "relay@example.org"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.logged("config_reloaded"), timeout=10, what="the reload")
    sqlite_harness.enqueue(fossil_message(subject="after reload"))
    wait_until(lambda: fake_sendmail.calls(), timeout=10, what="the delivery")
    [(argv, _)] = fake_sendmail.calls()
    assert "relay@example.org" in argv
    assert len(d.logged("relay_started")) == 2 and d.alive()


def test_sighup_reopens_the_log_file(sqlite_harness, tmp_path):
    """After logrotate renames the log file, SIGHUP makes the daemon write to a new file at the path."""
    log = tmp_path / "mailrelayd.log"
    proc = subprocess.Popen([sys.executable, "-m", "mailrelayd", *allow_root([*sqlite_harness.cli_args, "--log-file",
                             str(log), "--command", "/bin/true"])], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: log.exists() and "relay_started" in log.read_text(), timeout=10, what="the first log")
        log.rename(tmp_path / "mailrelayd.log.1")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log.exists() and "config_reloaded" in log.read_text(), timeout=10,
                   what="lines in a new log file")
        assert "config_reloaded" not in (tmp_path / "mailrelayd.log.1").read_text()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("change", [{"log_level": "info"}, {"log_format": "console", "log_level": "info"}])
def test_a_reload_changes_how_the_running_relays_log(sqlite_harness, tmp_path, change):
    """After SIGHUP with a new log_level or log_format, the running queue's relay logs to the log file with them (it once went silent)."""
    log = tmp_path / "mailrelayd.log"
    base = f'db = "{sqlite_harness.path}"\nlog_file = "{log}"\ncommand = "/bin/true"\nlog_format = "json"\n'
    config = write_config(tmp_path / "relay.toml", base + 'log_level = "warning"\n')
    proc = subprocess.Popen([sys.executable, "-m", "mailrelayd", *allow_root(["--config", str(config), "--poll-interval",
                                                                           "1h"])],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        sqlite_harness.enqueue(fossil_message(subject="before"))
        wait_until(lambda: sqlite_harness.queued() == 0, timeout=10, what="the first message to go")
        assert "message_sent" not in log.read_text()  # warning and above only
        lines = base.replace('log_format = "json"\n', "") + "".join(f'{k} = "{v}"\n' for k, v in change.items())
        config.write_text(lines if "log_format" in change else lines + 'log_format = "json"\n')
        proc.send_signal(signal.SIGHUP)
        sqlite_harness.enqueue(fossil_message(subject="after"))
        wait_until(lambda: "message_sent" in log.read_text(), timeout=10, what="the relay's line after the reload")
        [line] = [line for line in log.read_text().splitlines() if "message_sent" in line]
        assert line.startswith("{") == ("log_format" not in change), line
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


# -- many queues ----------------------------------------------------------------------------


def test_one_process_relays_every_queue_table_and_glob(tmp_path, fake_sendmail, daemon):
    """[[queue]] tables (a SQLite file, a spool and a glob) are all relayed by one process, a jail added later included."""
    db = SqliteHarness(tmp_path / "one" / "emailqueue.db")
    spool = SpoolHarness(tmp_path / "two")
    jails = tmp_path / "jails"
    (jails / "a").mkdir(parents=True)
    jail_a = SqliteHarness(jails / "a" / "emailqueue.db")
    config = write_config(tmp_path / "relay.toml", f"""
poll_interval = "0.2s"
settle = 0
[[queue]]
db = "{db.path}"
[[queue]]
spool = "{spool.path}"
[[queue]]
db = "{jails}/*/emailqueue.db"
""")
    d = daemon("--config", str(config))
    messages = [fossil_message(subject="to the db"), fossil_message(subject="to the spool"),
                fossil_message(subject="to jail a")]
    db.enqueue(messages[0])
    spool.enqueue(messages[1])
    jail_a.enqueue(messages[2])
    (jails / "b").mkdir()
    jail_b = SqliteHarness(jails / "b" / "emailqueue.db")
    messages.append(fossil_message(subject="to jail b, created later"))
    jail_b.enqueue(messages[3])
    wait_until(lambda: sorted(fake_sendmail.bodies()) == sorted(to_lf(m) for m in messages), timeout=20,
               what="every queue's message")
    wait_until(lambda: len(d.logged("message_sent")) == 4, what="every delivery recorded and logged")
    queues = {e["queue"] for e in d.logged("message_sent")}
    assert queues == {str(db.path), str(spool.path), str(jail_a.path), str(jail_b.path)}


def test_a_broken_queue_never_stalls_another(tmp_path, fake_sendmail, daemon):
    """A queue that is not a SQLite file is reported while the next queue's mail keeps flowing."""
    broken = tmp_path / "broken" / "emailqueue.db"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not a database" * 100)
    good = SqliteHarness(tmp_path / "good" / "emailqueue.db")
    config = write_config(tmp_path / "relay.toml", f'[[queue]]\ndb = "{broken}"\n[[queue]]\ndb = "{good.path}"\n')
    d = daemon("--config", str(config))
    data = fossil_message(subject="still flowing")
    good.enqueue(data)
    wait_until(lambda: fake_sendmail.bodies() == [to_lf(data)], timeout=10, what="the good queue's message")
    errors = wait_until(lambda: [e for e in d.logged("queue_unavailable") if e.get("queue") == str(broken)],
                        timeout=10, what="the broken queue's error")
    assert errors and d.alive()


def test_status_lists_every_configured_queue(tmp_path):
    """`status --json` with [[queue]] tables reports each queue by path, and the totals."""
    first = SqliteHarness(tmp_path / "a" / "emailqueue.db")
    second = SqliteHarness(tmp_path / "b" / "emailqueue.db")
    first.enqueue(fossil_message())
    second.enqueue(fossil_message())
    second.enqueue(fossil_message())
    config = write_config(tmp_path / "relay.toml", f'[[queue]]\ndb = "{first.path}"\n[[queue]]\ndb = "{second.path}"\n')
    result = run_cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queued"] == 3
    assert {q["queue"]: q["queued"] for q in report["queues"]} == {str(first.path): 1, str(second.path): 2}


# -- --daemon --------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _gone(pid: int) -> bool:
    try:
        return _proc_stat(pid)[0] in ("Z", "X")
    except OSError:
        return True


def test_daemon_detaches_writes_its_pidfile_and_stops_on_sigterm(sqlite_harness, fake_sendmail, tmp_path):
    """--daemon returns at once, leaves a detached process named in the pidfile, which relays and stops cleanly on SIGTERM."""
    pidfile, log = tmp_path / "mailrelayd.pid", tmp_path / "mailrelayd.log"
    started = run_cli("--daemon", *sqlite_harness.cli_args, "--pidfile", str(pidfile), "--log-file", str(log),
                      "--command", f"{fake_sendmail.path} -ti", timeout=30)
    assert started.returncode == 0, started.stderr
    pid = 0
    try:
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30, what="the pidfile"))
        stat = _proc_stat(pid)
        assert int(stat[3]) != os.getsid(0), "still in the caller's session"  # field 6: session
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        umask = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Umask")]
        assert umask == ["Umask:\t0027"]
        data = fossil_message(subject="from a detached daemon")
        sqlite_harness.enqueue(data)
        wait_until(lambda: fake_sendmail.bodies() == [to_lf(data)], timeout=10, what="the delivery")
        second = run_cli("--daemon", *sqlite_harness.cli_args, "--pidfile", str(pidfile), "--command", "/bin/true")
        assert second.returncode == 75 and str(pid) in second.stderr
    finally:  # never leave a detached daemon behind, even when the pidfile came late
        pid = pid or int(pidfile.read_text().strip() or 0) if pidfile.exists() else pid
        if pid:
            os.kill(pid, signal.SIGTERM)
    wait_until(lambda: _gone(pid), timeout=15, what="the daemon to exit")
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "relay_stopped" in events and pidfile.read_text() == ""


# -- metrics -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_count_what_the_daemon_sends(sqlite_harness, daemon):
    """--metrics serves Prometheus text counting the queue's sent messages and delivery durations."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    port = _free_port()
    sqlite_harness.enqueue(fossil_message())
    d = daemon(*sqlite_harness.cli_args, "--metrics", f"127.0.0.1:{port}")
    wait_until(lambda: sqlite_harness.queued() == 0, timeout=10, what="the delivery")

    def scrape() -> dict:
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {(s.name, s.labels.get("queue"), s.labels.get("state")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    queue = str(sqlite_harness.path)
    samples = wait_until(lambda: (m := scrape()).get(("mailrelayd_messages_sent_total", queue, None)) == 1 and m,
                         timeout=10, what="the sent counter")
    assert samples[("mailrelayd_delivery_seconds_count", queue, None)] == 1
    assert d.alive()


def test_metrics_address_in_use_is_one_line_and_exit_78(sqlite_harness):
    """A --metrics address that cannot be bound stops the daemon at once with one line and exit status 78."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(*sqlite_harness.cli_args, "--command", "/bin/true", "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == 78
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


class _PlantedBug(Exception):
    pass


def _service_with_a_crashing_queue(tmp_path, fake_sendmail, good, bad, on_build=None):
    """A Service over two real SQLite queues whose relays come from the composition root,
    but the `bad` queue's claims raise (a bug planted for the test)."""
    from mailrelayd import compose, log
    from mailrelayd.config import build
    from mailrelayd.queues.sqlite import SqliteQueue
    from mailrelayd.relay import Relay
    from mailrelayd.service import Service

    class Exploding(SqliteQueue):
        def claim(self, now, limit):
            raise _PlantedBug("planted")

    log.configure("json", "info", log_file=tmp_path / "service.log")
    config = build({"command": f"{fake_sendmail.path} -ti", "allow_concurrent": True,
                    "queue": [{"db": str(good.path)}, {"db": str(bad.path)}]}, {})

    def build_relay(queue, supervision):
        if on_build is not None:
            on_build(queue)
        if queue.db == bad.path:
            return Relay(Exploding(bad.path, lease=60, sentlog_retention=86400), compose.make_transport(queue),
                         supervision=supervision)
        return compose.make_relay(queue, supervision)

    return Service(config, build_relay=build_relay, reload_config=lambda: config,
                   lock_path=lambda queue: compose.make_queue(queue).lock_path)


def _events(tmp_path):
    return [json.loads(line) for line in (tmp_path / "service.log").read_text().splitlines()]


def test_a_crashing_relay_is_restarted_with_backoff_and_the_other_queue_flows(tmp_path, fake_sendmail):
    """An exception in one queue's relay stops that queue only: relay_crashed, restarts after 1 s then 2 s, while the other queue's mail goes out."""
    good, bad = SqliteHarness(tmp_path / "good" / "emailqueue.db"), SqliteHarness(tmp_path / "bad" / "emailqueue.db")
    bad.enqueue(fossil_message(subject="poison"))
    service = _service_with_a_crashing_queue(tmp_path, fake_sendmail, good, bad)
    thread = threading.Thread(target=service.run)
    thread.start()
    try:
        good.enqueue(fossil_message(subject="innocent"))
        wait_until(lambda: good.queued() == 0, timeout=10, what="the innocent queue's message to go out")
        wait_until(lambda: len([e for e in _events(tmp_path) if e["event"] == "relay_crashed"]) >= 2, timeout=15,
                   what="two crashes of the bad queue")
        crashes = [e for e in _events(tmp_path) if e["event"] == "relay_crashed"]
        assert [c["restart_in_s"] for c in crashes[:2]] == [1.0, 2.0]
        first, second = (datetime.fromisoformat(c["timestamp"].rstrip("Z")) for c in crashes[:2])
        assert (second - first).total_seconds() < 5, "restarted at the next poll, not after its backoff of 1 s"
        assert all(c["queue"] == str(bad.path) and "planted" in c["error"] for c in crashes)
        good.enqueue(fossil_message(subject="still flowing"))
        wait_until(lambda: good.queued() == 0, timeout=10, what="the innocent queue to keep flowing")
    finally:
        service.request_stop()
        thread.join(timeout=30)
    assert service.exit_status == 0 and bad.queued() == 1


def test_a_failure_of_the_supervisor_itself_exits_70(tmp_path, fake_sendmail):
    """Only the supervisor's own failure ends the process, with exit status 70 and service_crashed."""
    good, bad = SqliteHarness(tmp_path / "good" / "emailqueue.db"), SqliteHarness(tmp_path / "bad" / "emailqueue.db")

    def fail(queue):
        raise _PlantedBug("a bug in the supervisor's own path")

    service = _service_with_a_crashing_queue(tmp_path, fake_sendmail, good, bad, on_build=fail)
    assert service.run() == 70
    assert [e for e in _events(tmp_path) if e["event"] == "service_crashed"]
