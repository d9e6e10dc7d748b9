"""Real mail software for end-to-end tests: an SMTP sink, a Fossil repository, msmtp, Postfix.

Import the fixtures into a test module (`from mta import smtp_sink, ...`, or
`from mta import ...` when tests/ is on sys.path); nothing here needs conftest.py.

- `smtp_sink`: an aiosmtpd server on 127.0.0.1, on a port the kernel picked, that records
  every envelope (MAIL FROM, RCPT TOs, DATA bytes) and can be told to answer 4xx/5xx.
- `fossil_repo`: a real `fossil init` repository whose alerts go to a tmp emailqueue.db
  (email-send-method=db), with helpers for test messages, subscribers, check-ins and
  `fossil alerts send`.
- `msmtp_command`: `msmtp -C FILE -t` with FILE pointing msmtp at the sink (no TLS, no auth).
- `postfix_instance`: a private Postfix (own config and queue directories, relayhost = the
  sink) whose `sendmail -C DIR -ti` goes through postdrop, pickup, cleanup, qmgr and smtp.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FOSSIL = shutil.which("fossil")
MSMTP = shutil.which("msmtp")
POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if os.access("/usr/sbin/postfix", os.X_OK) else None)
POSTFIX_SENDMAIL = "/usr/sbin/sendmail"
POSTFIX_MASTER_TEMPLATE = Path("/usr/share/postfix/master.cf.dist")


def require(program: str | None, name: str) -> str:
    """The program's path, or skip the test saying which package is missing."""
    if not program:
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return program


def crlf(data: bytes) -> bytes:
    """`data` with every line ending made CRLF, as it travels over SMTP."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# -- an SMTP server that records what it is given ----------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    """One SMTP transaction as the sink saw it.

    `data` is the DATA section exactly as received (CRLF line endings), after the
    RFC 5321 section 4.5.2 transparency step: aiosmtpd itself removes the leading dot
    that the client added to lines starting with a dot.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass
class SmtpSink:
    """An aiosmtpd server on its own thread and event loop; `messages` fills as mail arrives.

    Set `rcpt_reply` (for example "550 5.1.1 No such user" or "451 4.3.0 Try later") to
    answer every RCPT TO with it instead of accepting, or `rcpt_replies` for some addresses.
    """

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[ReceivedMail] = field(default_factory=list)
    rcpt_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # per address, overrides rcpt_reply
    rejected: list[str] = field(default_factory=list)

    def start(self) -> None:
        from aiosmtpd.smtp import SMTP

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smtp-sink", daemon=True)
        self._thread.start()

        async def serve():
            return await self._loop.create_server(
                lambda: SMTP(self, hostname="sink.test", ident="mailrelayd test sink", decode_data=False),
                sock=sock,
            )

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        async def close():
            self._server.close()
            await self._server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def received(self) -> list[ReceivedMail]:
        """A snapshot of the mail received so far (safe while the server runs)."""
        with self._lock:
            return list(self.messages)

    # aiosmtpd handler hooks (run on the sink's event loop)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address, self.rcpt_reply)
        if reply:
            with self._lock:
                self.rejected.append(address)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        mail = ReceivedMail(envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content))
        with self._lock:
            self.messages.append(mail)
        return "250 2.0.0 OK: queued"


@pytest.fixture
def smtp_sink():
    """An SMTP server on 127.0.0.1 (ephemeral port) recording every message it accepts."""
    pytest.importorskip("aiosmtpd", reason="aiosmtpd is not installed (pip install aiosmtpd)")
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


# -- msmtp ------------------------------------------------------------------------------


def write_msmtp_config(path: Path, port: int, host: str = "127.0.0.1") -> Path:
    """An msmtp configuration sending to host:port in the clear, without authentication."""
    path.write_text(
        "defaults\n"
        "auth off\n"
        "tls off\n"
        "syslog off\n"
        f"logfile {path.parent / 'msmtp.log'}\n"
        "account default\n"
        f"host {host}\n"
        f"port {port}\n"
        "domain mailrelayd-test.example\n"
        "from msmtp-default@sender.invalid\n"  # so a missing `-f` shows

        "timeout 20\n"
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def msmtp_command(smtp_sink, tmp_path) -> str:
    """The `--command` that makes mailrelayd deliver with msmtp into `smtp_sink`."""
    require(MSMTP, "msmtp")
    config = write_msmtp_config(tmp_path / "msmtprc", smtp_sink.port)
    return f"{MSMTP} -C {config} -t"


# -- Fossil -----------------------------------------------------------------------------


class FossilRepo:
    """A real Fossil repository whose alerts are queued (method db) into `queue`.

    Fossil 2.21 queues subscriber alerts in `fossil alerts send` only when email-self,
    email-subname AND email-url are all set; without one of them it sends nothing and
    says nothing. The queue file is only created when the first message is written.
    """

    def __init__(self, root: Path, queue: Path, self_address: str = "noreply@example.org",
                 project: str = "Demo Project", url: str = "https://fossil.example.org/demo"):
        self.root = root
        self.queue = queue
        self.path = root / "repo.fossil"
        self.checkout = root / "checkout"
        self.self_address = self_address
        home = root / "home"  # Fossil's global config (~/.config/fossil.db) stays in here
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "USER": "admin", "HOME": str(home)}
        self.env.pop("XDG_CONFIG_HOME", None)
        self.env.pop("FOSSIL_HOME", None)
        self.env.pop("FOSSIL_USER", None)
        self.fossil("init", str(self.path))
        for name, value in (
            ("email-send-method", "db"),
            ("email-send-db", str(queue)),
            ("email-self", self_address),
            ("email-subname", project),
            ("email-url", url),
            ("backoffice-disable", "1"),  # nothing sends behind our back
        ):
            self.fossil("settings", name, value, "-R", str(self.path))
        self.fossil("alerts", "status", "-R", str(self.path))  # creates the subscriber table

    def fossil(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([FOSSIL or "fossil", *args], cwd=cwd or self.root, env=self.env,
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"fossil {' '.join(args)} exited {proc.returncode}: {proc.stderr or proc.stdout}")
        return proc

    def test_message(self, *to: str, subject: str = "Hello", body: str | None = None) -> None:
        """`fossil alerts test-message TO... -S SUBJECT [--body FILE]`: one message, all in To:."""
        args = ["alerts", "test-message", *to, "-S", subject, "-R", str(self.path)]
        if body is not None:
            body_file = self.root / "body.txt"
            body_file.write_bytes(body.encode())
            args += ["--body", str(body_file)]
        self.fossil(*args)

    def add_subscriber(self, address: str, events: str = "c") -> None:
        """A verified subscriber to `events` (c check-ins, w wiki, t tickets, f forum, a announcements)."""
        with sqlite3.connect(self.path) as conn:
            conn.execute(
                "INSERT INTO subscriber(semail, suname, sverified, sdonotcall, sdigest, ssub, sctime, mtime,"
                " smip, lastContact) VALUES (?, NULL, 1, 0, 0, ?, CAST(strftime('%s','now') AS INT),"
                " CAST(strftime('%s','now') AS INT), '127.0.0.1', CAST(julianday('now') - 2440587.5 AS INT))",
                (address, events),
            )
        conn.close()

    def commit(self, name: str = "hello.txt", content: str = "hello\n", message: str = "A check-in") -> None:
        """Make a check-in (opening a checkout the first time); it becomes a pending alert."""
        if not self.checkout.exists():
            self.checkout.mkdir()
            self.fossil("open", str(self.path), cwd=self.checkout)
        (self.checkout / name).write_text(content)
        self.fossil("add", name, cwd=self.checkout)
        self.fossil("commit", "-m", message, "--no-warnings", cwd=self.checkout)

    def send_alerts(self) -> None:
        """`fossil alerts send`: one message per subscriber for each pending event."""
        self.fossil("alerts", "send", "-R", str(self.path))

    def queued(self) -> list[tuple[int, bytes]]:
        """The rows of the queue's `email` table, as (emailid, msg bytes)."""
        if not self.queue.exists():
            return []
        with sqlite3.connect(self.queue) as conn:
            rows = conn.execute("SELECT emailid, CAST(msg AS BLOB) FROM email ORDER BY emailid").fetchall()
        conn.close()
        return rows


@pytest.fixture
def fossil_repo(tmp_path) -> FossilRepo:
    """A fresh Fossil repository set up to queue its mail in tmp_path/emailqueue.db."""
    require(FOSSIL, "fossil")
    root = tmp_path / "fossil"
    root.mkdir()
    return FossilRepo(root, tmp_path / "emailqueue.db")


# -- a private Postfix instance -----------------------------------------------------------


class PostfixInstance:
    """Postfix with its own config_directory and queue_directory, relaying to host:port.

    Nothing in the system's /etc/postfix is written: main.cf and master.cf are our own
    (the package's master.cf.dist is the template); only the package's own support
    files there (postfix-script, postfix-files, via meta_directory) are read. It listens on no port: mail enters through
    `sendmail -C DIR` (postdrop into its maildrop, then pickup) and leaves through its
    smtp client to `relayhost`. Its daemons run as the `postfix` user, so its directory
    lives in a world-traversable place (pytest's tmp_path is mode 0700), not tmp_path.
    """

    def __init__(self, relay_host: str, relay_port: int):
        self.root = Path(tempfile.mkdtemp(prefix="mailrelayd-postfix-"))
        self.root.chmod(0o755)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.log = self.root / "maillog"
        self.relay = f"[{relay_host}]:{relay_port}"
        self.sendmail = f"{POSTFIX_SENDMAIL} -C {self.config_dir} -ti"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([POSTFIX or "postfix", "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}"
                               f"\n{self.maillog()}")
        return proc

    def configure(self) -> None:
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(mode=0o755)
        owner = pwd.getpwnam("postfix")
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        master = POSTFIX_MASTER_TEMPLATE.read_text().splitlines()
        # No listener: drop the `smtp inet ... smtpd` service; everything else as shipped.
        kept = [line for line in master if not (line.startswith("smtp ") and " inet " in line)]
        (self.config_dir / "master.cf").write_text("\n".join(kept) + "\n")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.root),
            "myhostname": "mailrelayd-test.example",
            "mydomain": "example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks_style": "host",
            "relayhost": self.relay,
            "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        # No chroot: a chroot would need copies of /etc files inside the queue directory.
        subprocess.run(["postconf", "-c", str(self.config_dir), "-F", "*/*/chroot = n"], check=True,
                       capture_output=True, timeout=30)

    def start(self) -> None:
        self.configure()
        self._postfix("check")
        self._postfix("start")

    def running(self) -> bool:
        return self._postfix("status", check=False).returncode == 0

    def stop(self, timeout: float = 30.0) -> None:
        """`postfix stop`, then wait (bounded) until its master has exited; abort if it will not."""
        if not self.running():
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self._postfix("abort", check=False)
                break
            time.sleep(0.05)

    def queue_empty(self) -> bool:
        """True when the instance holds no mail (maildrop, incoming, active, deferred)."""
        out = subprocess.run(["postqueue", "-c", str(self.config_dir), "-j"], capture_output=True, text=True,
                             timeout=30)
        maildrop = list((self.queue_dir / "maildrop").iterdir())
        return out.returncode == 0 and not out.stdout.strip() and not maildrop

    def maillog(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postfix_instance(smtp_sink):
    """A running private Postfix relaying to `smtp_sink`; stopped and removed at teardown."""
    require(POSTFIX, "postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (postfix start)")
    if not POSTFIX_MASTER_TEMPLATE.exists() or not os.access(POSTFIX_SENDMAIL, os.X_OK):
        pytest.skip("postfix is not fully installed (no master.cf.dist or sendmail)")
    instance = PostfixInstance(smtp_sink.host, smtp_sink.port)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        instance.remove()
