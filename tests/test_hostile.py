"""Attacks from inside a jail, against one daemon that serves two jails.

Each test runs the real daemon over two queues of one kind, the attacker's and an
innocent one, makes one attack on the attacker's, and then checks the promise: the
process still runs, the innocent queue's new mail goes out within 2 s, files outside the
jails are byte for byte unchanged, and the daemon's descriptors and memory stay flat.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Daemon, SpoolHarness, SqliteHarness, fossil_message, wait_until


@dataclass
class Jails:
    attacker: SqliteHarness | SpoolHarness
    innocent: SqliteHarness | SpoolHarness
    outside: Path
    daemon: Daemon
    fake: object
    before: dict
    baseline: tuple[int, int] = (0, 0)

    def settle_baseline(self) -> None:
        """Descriptors and RSS once the daemon has started and delivered something."""
        self.assert_innocent_flows()
        self.baseline = self.usage()

    def usage(self) -> tuple[int, int]:
        """(open descriptors, RSS in KiB) of the daemon, once no sendmail it started still
        runs (a child's pipes are not a leak)."""
        pid = self.daemon.pid
        wait_until(lambda: not children(pid), timeout=10, what="the daemon's sendmail children to exit")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return fds, rss

    def assert_innocent_flows(self) -> None:
        subject = f"innocent {time.monotonic_ns()}"
        self.innocent.enqueue(fossil_message(subject=subject))
        wait_until(lambda: any(subject.encode() in body for body in self.fake.bodies()), timeout=2,
                   what="the innocent queue's new message to go out")
        # ...and its delivery to be over (sendmail exited, the outcome recorded): no descriptor in flight
        wait_until(lambda: any(e.get("subject") == subject for e in self.daemon.logged("message_sent")), timeout=2,
                   what="the innocent message's delivery to be recorded")

    def assert_promise(self) -> None:
        """The process runs, the innocent queue flows, nothing outside changed, usage is flat."""
        assert self.daemon.alive(), self.daemon.log_path.read_text()[-2000:]
        self.assert_innocent_flows()
        assert snapshot(self.outside) == self.before
        fds, rss = self.usage()
        assert fds <= self.baseline[0] + 2, f"descriptors grew from {self.baseline[0]} to {fds}"
        assert rss <= self.baseline[1] + 30 * 1024, f"RSS grew from {self.baseline[1]} to {rss} KiB"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def snapshot(directory: Path) -> dict:
    """Every file below `directory`, with its bytes (links as their targets)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = path.read_bytes()
        else:
            found[str(path)] = "dir"
    return found


def make_outside(tmp_path: Path) -> Path:
    """Files outside both jails: another jail's repository and a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()
    with sqlite3.connect(outside / "repo.fossil") as conn:
        conn.execute("CREATE TABLE blob(rid INTEGER PRIMARY KEY, content BLOB)")
        conn.execute("INSERT INTO blob(content) VALUES (x'00ff')")
    (outside / "secret").write_bytes(b"To: attacker@evil.example\n\nroot:$6$SECRET:19000:0:99999:7:::\n")
    (outside / "drop").mkdir()
    return outside


@pytest.fixture(params=["sqlite", "spool"])
def kind(request):
    return request.param


@pytest.fixture
def jails(kind, tmp_path, fake_sendmail):
    """start(**attacker_settings, before=callable): the daemon over both jails, returned as Jails."""
    started = []

    def start(before=None, **attacker_settings) -> Jails:
        def harness(name):
            root = tmp_path / name
            return SqliteHarness(root / "emailqueue.db") if kind == "sqlite" else SpoolHarness(root)

        attacker, innocent = harness("jail-a"), harness("jail-b")
        outside = make_outside(tmp_path)
        if before is not None:
            before(attacker, outside)
        key = "db" if kind == "sqlite" else "spool"
        table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in attacker_settings.items())
        config = tmp_path / "mailrelayd.toml"
        config.write_text(f'command = "{fake_sendmail.path} -ti"\nsettle = 0\npoll_interval = "1s"\nsql_timeout = "1s"\n'
                          f'[[queue]]\n{key} = "{attacker.path}"\n{table}'
                          f'[[queue]]\n{key} = "{innocent.path}"\n')
        daemon = Daemon(tmp_path / "daemon.log", ["--config", str(config)])
        started.append(daemon)
        wait_until(lambda: daemon.logged("service_ready"), timeout=15, what="the daemon to be ready")
        found = Jails(attacker, innocent, outside, daemon, fake_sendmail, snapshot(outside))
        found.settle_baseline()
        return found

    yield start
    for daemon in started:
        daemon.stop()


# -- what any forum user can write -------------------------------------------------------


@pytest.mark.parametrize("subject", ["=?utf-8?b?A?=", "=?x-unknown-charset?q?abc?=", "\x1b]52;c;cm0gLXJmIH4=\x07",
                                     "caf\xe9 \u2028 \u202e"])
def test_a_forum_title_is_mail_not_an_attack(jails, subject):
    """A subject that is a broken encoded word, an unknown charset or terminal escapes is delivered like any other."""
    j = jails()
    j.attacker.enqueue(fossil_message(subject=subject).replace(b"Subject: ", b"Subject: [forum] "))
    wait_until(lambda: j.attacker.queued() == 0, timeout=10, what="the forum alert to go out")
    assert len(j.daemon.logged("message_sent")) == 2
    j.assert_promise()


@pytest.mark.parametrize("to", ["(" * 5000 + "a@example.com" + ")" * 5000, "g:" * 3000 + "a@example.com;",
                                "|/bin/sh -c id@example.com", ", ".join(f"u{i}@example.com" for i in range(500))])
def test_a_hostile_to_is_set_aside_unsent(jails, to):
    """Nested comments, groups, a command for an address, or 500 recipients: set aside with the reason, never handed to sendmail."""
    j = jails()
    j.attacker.enqueue(fossil_message(to=to, subject="hostile"))
    wait_until(lambda: j.attacker.failed(), timeout=10, what="the message to be set aside")
    assert not any(b"Subject: hostile" in body for body in j.fake.bodies())
    j.assert_promise()


def test_a_flood_over_the_rate_limit_waits(jails):
    """Fifty messages against rate_limit 5/h: five go, the rest wait untouched, and the innocent queue flows."""
    j = jails(rate_limit="5/h")
    for i in range(50):
        j.attacker.enqueue(fossil_message(to=f"victim{i}@example.com", subject=f"spam {i}"))
    spam = lambda: sum(b"Subject: spam" in body for body in j.fake.bodies())  # noqa: E731
    wait_until(lambda: j.daemon.logged("rate_limited") and spam() == 5, timeout=10, what="the limit to be reached")
    j.assert_promise()
    assert spam() == 5
    assert j.attacker.queued() == 45 and j.attacker.failed() == [] and j.attacker.deferred() == []


# -- what a jail can do to its own emailqueue.db ------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite"], indirect=True)
@pytest.mark.parametrize("column, value", [("attempts", "'many'"), ("recipients", "'{not json'"),
                                            ("owner", "x'00'"), ("next_try", "'soon'")])
def test_our_own_table_rewritten_by_the_jail_is_repaired(jails, column, value):
    """A row of mailrelayd_queue with a text count, bad JSON, a blob owner or a text time: repaired, the message sent."""
    j = jails()
    emailid = j.attacker.enqueue(fossil_message(subject="repaired"))
    with sqlite3.connect(j.attacker.path) as conn:
        conn.execute("INSERT OR REPLACE INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, lease_until)"
                     " VALUES (?, 1, ?, ?, ?)", (emailid, time.time(), time.time() - 1, time.time() + 3600))
        conn.execute(f"UPDATE mailrelayd_queue SET {column} = {value} WHERE emailid = ?", (emailid,))
    os.kill(j.daemon.pid, signal.SIGUSR1)  # look now
    wait_until(lambda: any(b"Subject: repaired" in body for body in j.fake.bodies()), timeout=10,
               what="the repaired message to go out")
    j.assert_promise()


@pytest.mark.parametrize("kind", ["sqlite"], indirect=True)
def test_a_trigger_that_never_ends_stops_only_its_own_queue(jails):
    """A trigger on email that recurses for ever: the attacker's queue is refused, naming it; the rest flows, and SIGTERM stops the process at once."""
    def plant(attacker, outside):
        with sqlite3.connect(attacker.path) as conn:
            conn.execute("CREATE TRIGGER spin AFTER DELETE ON email BEGIN"
                         " SELECT count(*) FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)"
                         " SELECT i FROM n); END")

    j = jails(before=plant)
    j.attacker.enqueue(fossil_message(subject="behind a trigger"))
    errors = [e for e in j.daemon.events() if "spin" in json.dumps(e)]
    assert errors and errors[0]["event"] == "queue_unavailable"
    j.assert_promise()
    started = time.monotonic()
    j.daemon.proc.terminate()
    assert j.daemon.proc.wait(timeout=20) == 0 and time.monotonic() - started < 10


@pytest.mark.parametrize("kind", ["sqlite"], indirect=True)
def test_a_symlink_to_another_jails_repository_is_refused(jails):
    """emailqueue.db pointing at another jail's repo.fossil: refused, and that file is never written."""
    def plant(attacker, outside):
        attacker.path.unlink()
        os.symlink(outside / "repo.fossil", attacker.path)

    j = jails(before=plant)
    assert any("symbolic link" in e.get("error", "") for e in j.daemon.logged("queue_unavailable"))
    j.assert_promise()
    assert not (j.outside / "repo.fossil-wal").exists()


@pytest.mark.parametrize("kind", ["sqlite"], indirect=True)
def test_a_huge_row_is_refused_unread(jails):
    """A 20 MB row against max_size 1M is refused unread (kept in email), and memory stays flat."""
    j = jails(max_size="1M")
    with sqlite3.connect(j.attacker.path) as conn:
        conn.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))",
                     (fossil_message(body="x" * 20_000_000),))
    wait_until(lambda: j.daemon.logged("message_refused"), timeout=10, what="the huge row to be refused")
    j.assert_promise()
    assert j.attacker.queued() == 1


@pytest.mark.parametrize("kind", ["sqlite"], indirect=True)
def test_millions_of_dead_claims_do_not_hold_up_the_oldest_message(jails):
    """Two hundred thousand rows claimed by dead processes: the oldest message still goes out."""
    j = jails()
    first = j.attacker.enqueue(fossil_message(subject="oldest"))
    with sqlite3.connect(j.attacker.path) as conn:
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)"
                     " INSERT INTO email(msg) SELECT 'x' FROM n")
        conn.execute("INSERT OR REPLACE INTO mailrelayd_queue(emailid, attempts, first_seen, next_try, owner,"
                     " lease_until) SELECT emailid, 0, ?1, ?1, ?2 || ':' || (5000000 + emailid) || ':1', ?1 + 3600"
                     " FROM email WHERE emailid != ?3", (time.time(), socket.gethostname(), first))
    wait_until(lambda: any(b"Subject: oldest" in body for body in j.fake.bodies()), timeout=15,
               what="the oldest message to go out")
    j.assert_promise()


# -- what a jail can do to its spool and the state beside it ------------------------------


@pytest.mark.parametrize("kind", ["spool"], indirect=True)
def test_a_symlinked_state_directory_is_refused(jails):
    """SPOOL.mailrelayd/corrupt as a link to a directory outside: the queue is refused, nothing is moved there."""
    def plant(attacker, outside):
        state = attacker.state
        for sub in ("deferred", "schedule", "failed", "sent", "tmp"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        os.symlink(outside / "drop", state / "corrupt")
        (attacker.path / "empty.email").write_bytes(b"")

    j = jails(before=plant)
    assert any("corrupt" in e.get("error", "") for e in j.daemon.logged("queue_unavailable"))
    j.assert_promise()
    assert list((j.outside / "drop").iterdir()) == []


@pytest.mark.parametrize("kind", ["spool"], indirect=True)
def test_a_trickle_of_refusable_entries_leaks_nothing(jails):
    """Hundreds of empty files, links and 250-character names are refused; descriptors stay flat and the log says it as a count."""
    j = jails()
    for i in range(150):
        (j.attacker.path / ("n" * 240 + f"{i:04d}.email")).write_bytes(b"")
        os.symlink(j.outside / "secret", j.attacker.path / f"link{i}.email")
    wait_until(lambda: not [n for n in os.listdir(j.attacker.path) if not n.startswith(".")], timeout=30,
               what="every entry to be refused")
    j.assert_promise()
    assert len(j.daemon.logged("message_refused")) <= 11  # ten in full, then one count a minute

