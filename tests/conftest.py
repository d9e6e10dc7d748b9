"""Shared fixtures: real SQLite queue files, a fake sendmail, an injected clock."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import site
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import strategies as st

from mailrelayd.queues.spool import SpoolQueue
from mailrelayd.queues.sqlite import SqliteQueue
from mailrelayd.relay import Relay, RetryPolicy
from mailrelayd.transports.pipe import PipeTransport

ROOT = Path(__file__).resolve().parent.parent

# What text from a queue must never bring to an administrator's terminal or into a log line:
# C0 and DEL, C1, line and paragraph separators, bidi controls, lone surrogates (bytes that
# were not UTF-8, decoded with surrogateescape).
TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
HOSTILE_CHARACTERS = "\x00\x07\t\n\r\x1b\x7f\x85\x9b\u2028\u2029\u202a\u202e\u2066\u2069\ufeff\udc80\udcff\ud800"


def hostile_text(max_size: int = 60) -> st.SearchStrategy[str]:
    """Any text, surrogates included, rich in the characters above."""
    return st.text(st.one_of(st.characters(exclude_categories=()), st.sampled_from(HOSTILE_CHARACTERS)),
                   max_size=max_size)


FAKE_SENDMAIL = r"""#!/bin/sh
# Fake sendmail for tests: records argv and stdin, then exits with CTL/status.
ctl="@CTL@"
d=$(mktemp -d "$ctl/calls/call.XXXXXXXX")
printf '%s\n' "$@" > "$d/argv"
cat > "$d/stdin"
[ -e "$ctl/record-ids" ] && { grep -E '^(Uid|Gid|Groups):' /proc/$$/status; echo "Home: $HOME"; } > "$d/ids"
if [ -s "$ctl/barrier" ]; then
    # Wait (at most 10 s) until this many deliveries run at once; else fail.
    n=$(cat "$ctl/barrier"); i=0
    touch "$ctl/arrived.$$"
    while [ "$(ls "$ctl" | grep -c '^arrived\.')" -lt "$n" ]; do
        i=$((i+1)); [ $i -gt 1000 ] && exit 75
        sleep 0.01
    done
fi
[ -s "$ctl/delay" ] && sleep "$(cat "$ctl/delay")"
[ -s "$ctl/say" ] && cat "$ctl/say" >&2
touch "$d/done"
exit "$(cat "$ctl/status" 2>/dev/null || echo 0)"
"""


class FakeSendmail:
    """An executable sendmail stand-in; `calls()` gives (argv, stdin bytes) per run."""

    def __init__(self, root: Path):
        self.ctl = root
        (root / "calls").mkdir(parents=True)
        self.path = root / "sendmail"
        self.path.write_text(FAKE_SENDMAIL.replace("@CTL@", str(root)))
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def exit_with(self, status: int, say: str = "") -> None:
        (self.ctl / "status").write_text(str(status))
        (self.ctl / "say").write_text(say)

    def take_seconds(self, seconds: float) -> None:
        (self.ctl / "delay").write_text(str(seconds))

    def require_concurrency(self, n: int) -> None:
        (self.ctl / "barrier").write_text(str(n))

    def record_ids(self) -> None:
        """From now on, record each run's uids, gids, groups and HOME (see `ids`)."""
        (self.ctl / "record-ids").touch()

    def ids(self) -> list[dict[str, list[str]]]:
        """Per finished run since `record_ids`: {"Uid": [real, effective, saved, fs], "Gid": [...],
        "Groups": [...], "Home": [HOME]}, from /proc/PID/status."""
        found = []
        for d in (self.ctl / "calls").iterdir():
            if (d / "done").exists() and (d / "ids").exists():
                found.append({key: rest.split() for key, _, rest in
                              (line.partition(":") for line in (d / "ids").read_text().splitlines())})
        return found

    def calls(self) -> list[tuple[list[str], bytes]]:
        found = []
        for d in sorted((self.ctl / "calls").iterdir(), key=lambda p: p.stat().st_mtime_ns):
            if (d / "done").exists():
                found.append(((d / "argv").read_text().splitlines(), (d / "stdin").read_bytes()))
        return found

    def bodies(self) -> list[bytes]:
        return [data for _, data in self.calls()]


@pytest.fixture
def fake_sendmail(tmp_path) -> FakeSendmail:
    return FakeSendmail(tmp_path / "fake-sendmail")


def fossil_message(to: str = "bob@example.com", subject: str = "Hello", body: str = "Body text.\r\n",
                   sender: str = "noreply@example.org") -> bytes:
    """A message shaped like Fossil's: CRLF header lines, quoted-printable text body."""
    return (
        f"To: {to}\r\nSubject: {subject}\r\n"
        f'From: "Fossil" <{sender}>\r\nDate: Sun, 22 Nov 2026 03:41:57 +0000\r\n'
        f"Message-Id: <{abs(hash((to, subject, body)))}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"UTF-8\"\r\n"
        f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{body}"
    ).encode()


def utf8_message(to: str = "Zo\u00eb <zoe@example.com>") -> bytes:
    """A message as Fossil writes one for a user with a name that is not ASCII: raw UTF-8 in the
    Subject and the display names (UTF8_ENCODED is its header as encoded-words), and in the body."""
    return (f"To: {to}\r\nSubject: Caf\u00e9 \u00fcber alles\r\n"
            'From: "J\u00f6rg M\u00fcller" <noreply@example.org>\r\nMIME-Version: 1.0\r\n\r\nCaf\u00e9.\r\n').encode()


UTF8_ENCODED = (b"To: =?utf-8?q?Zo=C3=AB?= <zoe@example.com>\r\nSubject: =?utf-8?b?Q2Fmw6kgw7xiZXI=?= alles\r\n"
                b"From: =?utf-8?b?SsO2cmcgTcO8bGxlcg==?= <noreply@example.org>\r\nMIME-Version: 1.0\r\n\r\n"
                b"Caf\xc3\xa9.\r\n")


class SqliteHarness:
    """A Fossil emailqueue.db on disk, with helpers to fill and inspect it."""

    kind = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS email(emailid INTEGER PRIMARY KEY, msg TEXT)")
        self.cli_args = ["--db", str(path)]

    def enqueue(self, data: bytes) -> int:
        """Insert as Fossil does: one row, `msg` bound as text (even if not UTF-8)."""
        with sqlite3.connect(self.path, timeout=1.0) as conn:
            return conn.execute("INSERT INTO email(msg) VALUES (CAST(? AS TEXT))", (data,)).lastrowid

    def open_queue(self, lease: float = 180.0) -> SqliteQueue:
        queue = SqliteQueue(self.path, lease=lease, sentlog_retention=30 * 86400)
        queue.open()
        return queue

    # Python that, run in another process, opens this queue as `queue`.
    def open_queue_code(self) -> str:
        return (f"from mailrelayd.queues.sqlite import SqliteQueue; from pathlib import Path\n"
                f"queue = SqliteQueue(Path({str(self.path)!r}), lease=3600, sentlog_retention=0); queue.open()")

    def queued(self) -> int:
        return self._one("SELECT count(*) FROM email")

    def failed(self) -> list[tuple[str, int]]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute("SELECT reason, attempts FROM mailrelayd_failed ORDER BY id").fetchall()

    def deferred(self) -> list[tuple[int, float, str]]:
        """(attempts, next_try, last_error) of each deferred message."""
        with sqlite3.connect(self.path) as conn:
            try:
                return conn.execute("SELECT attempts, next_try, last_error FROM mailrelayd_queue"
                                    " WHERE attempts > 0 ORDER BY emailid").fetchall()
            except sqlite3.OperationalError:  # no relay has opened the file yet
                return []

    def age_sent_records(self, seconds: float) -> None:
        """Make every sentlog row `seconds` older."""
        with sqlite3.connect(self.path) as conn:
            conn.execute("UPDATE sentlog SET mtime = mtime - ?", (seconds,))

    def _one(self, sql: str):
        with sqlite3.connect(self.path) as conn:
            return conn.execute(sql).fetchone()[0]


class SpoolHarness:
    """A Fossil spool directory (email-send-method=dir) with its state beside it."""

    kind = "spool"

    def __init__(self, root: Path):
        self.path = root / "spool"
        self.path.mkdir(parents=True)
        self.state = root / "spool.mailrelayd"
        self.cli_args = ["--spool", str(self.path)]
        self._count = 0

    def enqueue(self, data: bytes) -> str:
        """Write as Fossil does: straight to the final name, no temporary, no lock."""
        self._count += 1
        name = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + f"{self._count:04d}{os.getpid() % 10**6:06d}.email"
        (self.path / name).write_bytes(data)
        return name

    def open_queue(self, lease: float = 180.0, **options) -> SpoolQueue:
        queue = SpoolQueue(self.path, **options)
        queue.open()
        return queue

    def open_queue_code(self) -> str:
        return (f"from mailrelayd.queues.spool import SpoolQueue; from pathlib import Path\n"
                f"queue = SpoolQueue(Path({str(self.path)!r})); queue.open()")

    def queued(self) -> int:
        """Messages still to send: new ones in the spool and deferred ones."""
        waiting = [n for n in os.listdir(self.path) if not n.startswith(".")]
        deferred = self.state / "deferred"
        if deferred.is_dir():
            waiting += os.listdir(deferred)
        return len(waiting)

    def failed(self) -> list[tuple[str, int]]:
        found = []
        for reason_file in sorted((self.state / "failed").glob("*.reason")):
            fields = dict(line.split(": ", 1) for line in reason_file.read_text().splitlines())
            found.append((fields["reason"], int(fields["attempts"])))
        return found

    def age_sent_records(self, seconds: float) -> None:
        """Make every kept sent file `seconds` older."""
        sent = self.state / "sent"
        for name in os.listdir(sent):
            os.utime(sent / name, (time.time() - seconds,) * 2)

    def deferred(self) -> list[tuple[int, float, str]]:
        schedule = self.state / "schedule"
        states = [json.loads(p.read_text()) for p in sorted(schedule.iterdir())] if schedule.is_dir() else []
        return [(s["attempts"], s["next_try"], s["last_error"]) for s in states]


@pytest.fixture(params=["sqlite", "spool"])
def queue_harness(request, tmp_path):
    """One harness per queue kind, so contract tests cover every kind."""
    if request.param == "spool":
        return SpoolHarness(tmp_path)
    return SqliteHarness(tmp_path / "emailqueue.db")


@pytest.fixture
def spool_harness(tmp_path):
    """For behaviour particular to a spool directory."""
    return SpoolHarness(tmp_path)


@pytest.fixture
def sqlite_harness(tmp_path):
    """For behaviour particular to Fossil's SQLite queue."""
    return SqliteHarness(tmp_path / "emailqueue.db")


class FakeClock:
    """Wall time that only moves when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_relay(fake_sendmail, clock):
    """Build a Relay over a harness's queue and the fake sendmail, on the fake clock."""
    relays = []

    def make(harness, workers: int = 2, timeout: float = 10.0, permanent=frozenset({65, 67}), **kwargs) -> Relay:
        transport = PipeTransport((str(fake_sendmail.path), "-ti"), timeout, frozenset(permanent))
        queue = harness.open_queue()
        relay = Relay(queue, transport, workers=workers, clock=clock,
                      retry=kwargs.pop("retry", RetryPolicy(300, 3600, 5 * 86400)), **kwargs)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.queue.close()


@pytest.fixture
def relay_pass(queue_harness, fake_sendmail):
    """relay_pass(status): one drain pass over the harness's queue with sendmail exiting `status`."""
    def run(status: int = 0, **queue_options):
        fake_sendmail.exit_with(status, say="sendmail says no" if status else "")
        transport = PipeTransport((str(fake_sendmail.path), "-ti"), 10.0, frozenset({65, 67}))
        if queue_harness.kind == "spool":
            queue_options.setdefault("settle", 0)  # files written just now are complete
        relay = Relay(queue_harness.open_queue(**queue_options), transport)
        try:
            return relay.drain()
        finally:
            transport.close()
            relay.queue.close()
    return run


# The commands that refuse to run as root without --user or --allow-root, besides the relay itself.
_REFUSED_AS_ROOT = ("retry", "purge", "test-message", "check-config")


def allow_root(args) -> list[str]:
    """`mailrelayd ARGS`'s arguments, with --allow-root added when the tests run as root (CI
    does) and the command would refuse to: the relay, retry, purge, test-message, check-config.
    Left alone: arguments that name a --user, and the commands that run as root anyway."""
    args = list(args)
    command = args[0] if args and not args[0].startswith("-") else ""
    if os.geteuid() != 0 or (command and command not in _REFUSED_AS_ROOT) or "--user" in args:
        return args
    return [command, "--allow-root", *args[1:]] if command else ["--allow-root", *args]


def run_cli(*args: str, timeout: float = 60, add_allow_root: bool = True, python: str = sys.executable,
            **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m mailrelayd ARGS` as a user would; capture output as text. Run as root,
    it relays as root (`allow_root`), unless `add_allow_root` is false. `python` may be
    another interpreter of this version: it finds this venv's packages too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    return subprocess.run([python, "-m", "mailrelayd", *(allow_root(args) if add_allow_root else args)],
                          capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def wait_until(condition, timeout: float = 10.0, what: str = "condition"):
    """Poll `condition()` until true or fail after `timeout` seconds (for other processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Daemon:
    """`python -m mailrelayd` running in the background, its JSON log in a file; `prefix`
    runs it through another command that execs it (such as setpriv)."""

    def __init__(self, log_path: Path, args: list[str], env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "mailrelayd", *allow_root(["--log-format", "json", *args])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            )
        self.pid = self.proc.pid

    def events(self) -> list[dict]:
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                found.append({"event": "unparsed", "line": line})
        return found

    def logged(self, event: str) -> list[dict]:
        return [e for e in self.events() if e.get("event") == event]

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon itself (not its children), from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def main_thread_switches(self) -> int:
        """Context switches of all the daemon's threads: unchanged while it sleeps."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except OSError:  # a thread that just ended
                continue
            total += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
        return total

    def wait_idle(self, quiet: float = 0.3, timeout: float = 10) -> None:
        """Wait until the relay's thread has not woken for `quiet` seconds (no scan pending)."""
        def still():
            before = self.main_thread_switches()
            time.sleep(quiet)  # the measurement window
            return self.main_thread_switches() == before
        wait_until(still, timeout=timeout, what="the daemon to go idle")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def daemon(tmp_path, fake_sendmail):
    """Start daemons with `daemon(*args)`; any still running is killed at teardown."""
    started = []

    def start(*args: str, command: str | None = None, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = ()) -> Daemon:
        d = Daemon(tmp_path / f"daemon{len(started)}.log",
                   [*args, "--command", command or f"{fake_sendmail.path} -ti"], env, prefix)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    kill_fakes(fake_sendmail)


def kill_fakes(fake_sendmail) -> None:
    """SIGKILL fake sendmails still running (each leads its own session, so its group goes)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(fake_sendmail.path).encode() in (entry / "cmdline").read_bytes():
                    os.killpg(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def started_calls(fake_sendmail) -> list[Path]:
    return list((fake_sendmail.ctl / "calls").iterdir())


# -- an unprivileged user (the tests that use it run as root, as CI does) ------------------


def _admin(*command: str) -> None:
    """Run useradd and friends, again while another process holds /etc/passwd's lock."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if "lock" not in done.stderr or time.monotonic() > deadline:
            raise AssertionError(f"{' '.join(command)}: {done.stderr}")
        time.sleep(0.1)  # another process's useradd holds the lock: nothing to wait on but time


@pytest.fixture(scope="session")
def relay_user():
    """A system user made for these tests (no home, no shell), with a supplementary group."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    name, extra = f"mrt{os.getpid()}", f"mrt{os.getpid()}x"
    _admin("groupadd", "--system", extra)
    _admin("useradd", "--system", "--home-dir", "/nonexistent", "--no-create-home", "--shell",
           "/usr/sbin/nologin", "--groups", extra, name)
    try:
        yield pwd.getpwnam(name)
    finally:
        _admin("userdel", name)
        _admin("groupdel", extra)


@pytest.fixture(scope="session")
def python(relay_user) -> str:
    """A Python that relay_user can read (switching to a user who cannot is refused): this one,
    or else the system's of the same version (one under /root, as pyenv's, is root's alone);
    run_cli gives it this venv's packages, which are pure Python."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            tried = subprocess.run([candidate, "-c", "import mailrelayd.cli.daemon, daemon, prometheus_client"],
                                   user=relay_user.pw_uid, env=env, cwd="/", capture_output=True)
        except OSError:
            continue
        if tried.returncode == 0:
            return candidate
    pytest.skip(f"no {version} that user {relay_user.pw_name} can read")


@pytest.fixture
def space(relay_user):
    """A directory tree the user can reach (pytest's tmp_path is root's alone): `jail`, the
    queue's directory, belongs to the user; `run`, for the pidfile and the log, to root."""
    root = Path(tempfile.mkdtemp(prefix="mailrelayd-user-"))
    root.chmod(0o755)
    (root / "jail").mkdir()
    os.chown(root / "jail", relay_user.pw_uid, relay_user.pw_gid)
    (root / "run").mkdir(mode=0o755)
    yield root
    shutil.rmtree(root)


def tree(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Everything under `directory`: (mode, owner, size) by path."""
    return {str(p.relative_to(directory)): (s.st_mode, s.st_uid, s.st_size)
            for p in sorted(directory.rglob("*")) for s in [p.lstat()]}
