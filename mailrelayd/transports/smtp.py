"""Deliver over SMTP to a smarthost: pooled connections, TLS, AUTH and PIPELINING.

Connections are kept open and shared by the delivering threads: a thread takes an idle
one (or opens one, up to `max_connections`), runs one mail transaction on it and gives
it back. A connection is retired after `max_messages` transactions, discarded after any
error, and closed by a reaper thread once idle for `idle_timeout`. A pooled connection
the server has dropped meanwhile is noticed before or at the first reply of the next
transaction (nothing of that transaction can have been delivered then), and the
message goes over a fresh connection instead.

Every read waits at most `reply_timeout`; a watchdog thread shuts the socket of any
delivery still running after `message_timeout`, so a server that trickles or stops
answering never holds a worker.

Outcomes follow the SMTP reply codes, per recipient: see `SmtpTransport.deliver`.
Nothing is logged here and no detail ever holds the password.
"""

from __future__ import annotations

import base64
import errno
import re
import select
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from mailrelayd.deadlines import Deadlines
from mailrelayd.message import Envelope
from mailrelayd.outcome import Outcome, PartlySent, PermanentFailure, Sent, TemporaryFailure

TLS_MODES = ("starttls", "implicit", "none")


@dataclass(frozen=True)
class SmtpSettings:
    """How to reach the smarthost; field names follow the configuration keys."""

    server: str
    port: int = 25
    use_tls: str = "starttls"  # "starttls" | "implicit" | "none"
    ca_file: str | None = None  # a private CA, trusted besides the system's
    insecure: bool = False  # no certificate verification at all
    user: str | None = None
    password: str | None = None
    allow_plaintext_auth: bool = False
    envelope_from: str | None = None  # smtp_from: a fixed MAIL FROM
    default_domain: str | None = None  # appended to recipients without "@"
    use_short_addr: bool = False  # let recipients without "@" through unchanged
    always_bcc: tuple[str, ...] = ()
    helo: str | None = None  # default: socket.getfqdn()
    max_messages: int = 100  # per connection
    idle_timeout: float = 30.0
    connect_timeout: float = 30.0
    reply_timeout: float = 60.0
    message_timeout: float = 600.0
    max_connections: int = 4

    def __repr__(self) -> str:  # never show the password, even in a traceback
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "password")
        return f"SmtpSettings({fields}, password={'***' if self.password else None})"


class SmtpSettingsError(ValueError):
    """The settings cannot work (raised by SmtpTransport() at start-up, not per message)."""


class SmtpTransport:
    """Sends each message in one SMTP transaction over a pooled connection."""

    def __init__(self, settings: SmtpSettings):
        self.settings = s = settings
        if s.use_tls not in TLS_MODES:
            raise SmtpSettingsError(f"use_tls must be one of {', '.join(TLS_MODES)}, not {s.use_tls!r}")
        for name in ("max_messages", "max_connections"):
            if getattr(s, name) < 1:
                raise SmtpSettingsError(f"{name} must be at least 1")
        for name in ("idle_timeout", "connect_timeout", "reply_timeout", "message_timeout"):
            if not getattr(s, name) > 0:
                raise SmtpSettingsError(f"{name} must be more than 0 seconds")
        if s.user is not None and s.password is None:
            raise SmtpSettingsError("smtp_user is set but there is no password (smtp_password_file)")
        for name, address in [("smtp_from", s.envelope_from)] + [("smtp_always_bcc", a) for a in s.always_bcc]:
            problem = _address_problem(address) if address else None
            if problem:
                raise SmtpSettingsError(f"{name} {address!r}: {problem}")
        self._context: ssl.SSLContext | None = None
        if s.use_tls != "none":
            self._context = ssl.create_default_context()
            if s.ca_file:
                try:
                    self._context.load_verify_locations(cafile=s.ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise SmtpSettingsError(f"cannot load smtp_ca_file {s.ca_file}: {e}") from None
            if s.insecure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self._helo = s.helo or socket.getfqdn()
        self._where = f"{s.server}:{s.port}"
        self._secrets = _secret_forms(s.password)
        self._refusal: Outcome | None = None
        if s.user is not None and s.use_tls == "none" and not s.allow_plaintext_auth:
            self._refusal = TemporaryFailure(
                f"refusing to send the SMTP password to {self._where} unencrypted: set use_tls to "
                "starttls or implicit (or smtp_allow_plaintext_auth, on a trusted network only)",
                setup_error=True,
            )
        self._pool = _Pool(s.max_connections, s.idle_timeout)
        self._watchdog = Deadlines("smtp-deadlines")

    # -- the Transport interface ----------------------------------------------------

    def deliver(self, data: bytes, envelope: Envelope) -> Outcome:
        """One transaction. Outcomes:

        - every recipient 2xx and the end of DATA 2xx: Sent(the server's last reply);
        - some recipients refused: the others get the message, PartlySent lists who was
          refused with which reply (4xx temporary, 5xx permanent);
        - all refused, or MAIL FROM / DATA refused: PermanentFailure when every refusal
          is 5xx, TemporaryFailure when every one is 4xx, else PartlySent(accepted=());
        - no connection, TLS failure, timeout, connection lost: TemporaryFailure;
          AUTH refused, STARTTLS missing, untrusted certificate: TemporaryFailure with
          setup_error (only the administrator can fix those; the mail is kept).
        """
        if self._refusal is not None:
            return self._refusal
        try:
            job = self._prepare(data, envelope)
        except _Done as done:
            return done.outcome
        for _ in range(self.settings.max_connections + 1):
            conn = self._pool.take()
            if conn is _CLOSED:
                return TemporaryFailure("the SMTP transport is shut down")
            if conn is not None and not conn.usable():
                self._pool.discard(conn)
                continue
            reused = conn is not None
            conn = conn or _Connection()
            with self._watchdog.watch(self.settings.message_timeout, conn.shut) as watch:
                try:
                    if not reused:
                        self._open(conn)
                    outcome = self._transaction(conn, job, reused)
                except _Stale:
                    self._pool.discard(conn)
                    continue
                except _Keep as kept:  # nothing was sent: the connection is as good as before
                    outcome = kept.outcome
                except _Done as done:
                    self._pool.discard(conn, quit=done.polite)
                    return self._clean(done.outcome)
                except Exception as e:  # noqa: BLE001 -- any failure on the wire is temporary
                    self._pool.discard(conn)
                    return self._clean(self._failure(e, conn, watch.fired))
            if conn.messages >= self.settings.max_messages:
                self._pool.discard(conn, quit=True)
            else:
                self._pool.give_back(conn)
            return self._clean(outcome)
        return TemporaryFailure(f"{self._where} kept dropping connections before answering")

    def close(self) -> None:
        """Close every connection (politely, with QUIT) and stop the helper threads."""
        self._pool.close()
        self._watchdog.stop()

    # -- preparing the message (once, whatever connection it goes over) -------------

    def _prepare(self, data: bytes, envelope: Envelope) -> _Job:
        s = self.settings
        sender = s.envelope_from or envelope.sender or ""
        problem = _address_problem(sender) if sender else None
        if problem:
            raise _Done(PermanentFailure(f"envelope sender {sender!r}: {problem}"))
        refused: list[tuple[str, str]] = []
        recipients: list[str] = []
        extra = () if envelope.remaining else s.always_bcc  # a retry after a partial send: they had it
        for address in (*envelope.recipients, *extra):
            if "@" not in address and not s.use_short_addr:
                if not s.default_domain:
                    refused.append((address, "not sent: the address has no domain "
                                             "(set smtp_default_domain, or use_short_addr)"))
                    continue
                address = f"{address}@{s.default_domain}"
            problem = _address_problem(address)
            if problem:
                refused.append((address, f"not sent: {problem}"))
            elif address not in recipients:
                recipients.append(address)
        if not recipients:
            raise _Done(_settle([], [(a, text, False) for a, text in refused]))
        wire = _wire_data(data, strip_bcc=True)  # as sendmail -t does; a Bcc: header is never for the eyes of others
        return _Job(sender, recipients, refused, wire, _EIGHT_BIT.search(wire) is not None)

    # -- one connection ---------------------------------------------------------------

    def _open(self, conn: _Connection) -> None:
        s = self.settings
        conn.smtp = smtp = _Smtp(local_hostname=self._helo)
        smtp._host = s.server  # what smtplib's connect() would record: STARTTLS checks the certificate against it
        conn.stage = "connect"
        sock = socket.create_connection((s.server, s.port), s.connect_timeout)
        smtp.sock = sock
        sock.settimeout(s.reply_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if s.use_tls == "implicit":
            conn.stage = "TLS handshake"
            smtp.sock = self._context.wrap_socket(sock, server_hostname=s.server)
        conn.stage = "greeting"
        code, message = smtp.getreply()
        if code != 220:
            raise _Done(TemporaryFailure(f"{self._where} refused the session: {_reply(code, message)}"), polite=True)
        conn.stage = "EHLO"
        smtp.ehlo_or_helo_if_needed()
        if s.use_tls == "starttls":
            if not smtp.has_extn("starttls"):
                raise _Done(TemporaryFailure(
                    f"{self._where} does not offer STARTTLS; mail is never sent in plaintext unless "
                    "use_tls = none", setup_error=True), polite=True)
            conn.stage = "STARTTLS"
            smtp.starttls(context=self._context)
            conn.stage = "EHLO after STARTTLS"
            code, message = smtp.ehlo()
            if code != 250:
                raise _Done(TemporaryFailure(f"{self._where} refused EHLO after STARTTLS: {_reply(code, message)}"))
        if s.user is not None:
            conn.stage = "AUTH"
            self._authenticate(smtp)
        conn.features = dict(smtp.esmtp_features)

    def _authenticate(self, smtp: smtplib.SMTP) -> None:
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mechanism is None:
            what = f"only {' '.join(offered)}" if offered else "no AUTH"
            raise _Done(TemporaryFailure(
                f"{self._where} offers {what}; mailrelayd authenticates with PLAIN or LOGIN", setup_error=True),
                polite=True)
        smtp.user, smtp.password = self.settings.user, self.settings.password
        try:
            smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
        except smtplib.SMTPAuthenticationError as e:
            reply = _reply(e.smtp_code, e.smtp_error)
            raise _Done(TemporaryFailure(
                f"{self._where} refused AUTH {mechanism} as {self.settings.user!r}: {reply}",
                setup_error=not 400 <= e.smtp_code < 500), polite=True) from None
        finally:
            smtp.password = None

    # -- one transaction ----------------------------------------------------------------

    def _transaction(self, conn: _Connection, job: _Job, reused: bool) -> Outcome:
        smtp, features = conn.smtp, conn.features
        utf8 = "smtputf8" in features
        failures = [(address, text, False) for address, text in job.refused]
        if not job.sender.isascii() and not utf8:
            raise _Keep(PermanentFailure(
                f"the envelope sender {job.sender!r} is not ASCII and {self._where} does not offer SMTPUTF8"))
        recipients = []
        for address in job.recipients:
            if address.isascii() or utf8:
                recipients.append(address)
            else:
                failures.append((address, f"not sent: the address is not ASCII and {self._where} "
                                          "does not offer SMTPUTF8", False))
        if not recipients:
            raise _Keep(_settle([], failures))
        params = []
        if "size" in features:
            params.append(f"SIZE={len(job.wire)}")
        if job.eight_bit and "8bitmime" in features:
            params.append("BODY=8BITMIME")
        if utf8 and not (job.sender.isascii() and all(a.isascii() for a in recipients)):
            params.append("SMTPUTF8")
        mail = f"MAIL FROM:<{job.sender}>{''.join(' ' + p for p in params)}\r\n".encode()
        rcpts = [f"RCPT TO:<{a}>\r\n".encode() for a in recipients]
        rset = conn.dirty
        conn.dirty = True  # until the end of DATA is answered
        pipelining = "pipelining" in features
        first = [reused]  # the first reply on a reused connection may show it went stale

        def send(*lines: bytes) -> None:
            try:
                smtp.sock.sendall(b"".join(lines))
            except (BrokenPipeError, ConnectionResetError):
                if first[0]:
                    raise _Stale() from None
                raise

        def reply(stage: str) -> tuple[int, str]:
            conn.stage = stage
            try:
                code, message = smtp.getreply()
            except smtplib.SMTPServerDisconnected as e:
                if first[0] and not isinstance(e.__context__, TimeoutError):
                    raise _Stale() from None
                raise
            if first[0] and code == 421:
                raise _Stale()
            first[0] = False
            return code, _reply(code, message)

        def ask(stage: str, line: bytes) -> tuple[int, str]:
            if not pipelining:
                send(line)
            return reply(stage)

        if pipelining:  # RFC 2920: the whole envelope and DATA in one go, then the replies
            send(*([b"RSET\r\n"] if rset else []), mail, *rcpts, b"DATA\r\n")
        if rset and ask("RSET", b"RSET\r\n")[0] != 250:
            raise _Stale()
        mail_code, mail_reply = ask("MAIL FROM", mail)
        if mail_code != 250:
            if pipelining:  # the rest was answered too (refused, surely): read it all
                for _ in rcpts:
                    reply("RCPT TO")
                if reply("DATA")[0] == 354:
                    raise _Done(_whole("MAIL FROM", recipients, mail_code, mail_reply, failures))
            return _whole("MAIL FROM", recipients, mail_code, mail_reply, failures)
        accepted: list[str] = []
        for address, line in zip(recipients, rcpts):
            code, text = ask(f"RCPT TO:<{address}>", line)
            if 200 <= code < 300:
                accepted.append(address)
            else:
                failures.append((address, text, _temporary(code)))
        if not accepted:
            if pipelining and reply("DATA")[0] == 354:  # no recipient, yet the data is awaited: hang up
                raise _Done(_settle([], failures))
            return _settle([], failures)
        data_code, data_reply = ask("DATA", b"DATA\r\n")
        if data_code != 354:
            return _whole("DATA", accepted, data_code, data_reply, failures)
        conn.stage = "sending the message"
        smtp.sock.settimeout(max(self.settings.reply_timeout, self.settings.message_timeout))
        send(job.wire)
        smtp.sock.settimeout(self.settings.reply_timeout)
        code, final = reply("end of DATA")
        conn.dirty = False
        conn.messages += 1
        if not 200 <= code < 300:
            return _whole("end of DATA", accepted, code, final, failures)
        return _settle(accepted, failures, final)

    # -- reporting ---------------------------------------------------------------------

    def _failure(self, error: BaseException, conn: _Connection, timed_out: bool) -> TemporaryFailure:
        s, stage = self.settings, conn.stage
        during = f" during {stage}" if stage else ""
        if timed_out:
            return TemporaryFailure(f"{self._where} did not finish the message within "
                                    f"message_timeout ({s.message_timeout:g} s){during}")
        cause = error.__context__ if isinstance(error, smtplib.SMTPServerDisconnected) else None
        if isinstance(error, ssl.SSLCertVerificationError):
            return TemporaryFailure(
                f"TLS certificate of {self._where} not trusted: {error.verify_message} (set smtp_ca_file to "
                "the CA that signed it, or check smtp_server matches the certificate)", setup_error=True)
        if isinstance(error, TimeoutError) or isinstance(cause, TimeoutError):
            limit = s.connect_timeout if stage == "connect" else s.reply_timeout
            return TemporaryFailure(f"{self._where} timed out{during} (no answer within {limit:g} s)")
        if isinstance(error, ssl.SSLError) or isinstance(cause, ssl.SSLError):
            e = error if isinstance(error, ssl.SSLError) else cause
            return TemporaryFailure(f"TLS error with {self._where}{during}: {e.reason or e}")
        if isinstance(error, socket.gaierror):
            return TemporaryFailure(f"cannot resolve {s.server}: {error.strerror}",
                                    setup_error=error.errno == socket.EAI_NONAME)
        if isinstance(error, ConnectionRefusedError):
            return TemporaryFailure(f"connection to {self._where} refused")
        if isinstance(error, smtplib.SMTPNotSupportedError):
            return TemporaryFailure(f"{self._where}{during}: {error}")
        if isinstance(error, smtplib.SMTPResponseException):
            return TemporaryFailure(f"{self._where} refused {stage}: {_reply(error.smtp_code, error.smtp_error)}")
        if isinstance(error, smtplib.SMTPServerDisconnected):
            return TemporaryFailure(f"{self._where} closed the connection{during}")
        if isinstance(error, OSError):
            reason = error.strerror or errno.errorcode.get(error.errno or 0) or str(error) or type(error).__name__
            return TemporaryFailure(f"network error with {self._where}{during}: {reason}")
        return TemporaryFailure(f"{type(error).__name__} with {self._where}{during}: {error}")

    def _clean(self, outcome: Outcome) -> Outcome:
        """`outcome` with the password (in any form a server might echo) removed from its texts."""
        if not self._secrets:
            return outcome

        def scrub(text: str) -> str:
            for secret in self._secrets:
                text = text.replace(secret, "***")
            return text

        match outcome:
            case Sent(detail=d) | PermanentFailure(detail=d) if any(x in d for x in self._secrets):
                return type(outcome)(scrub(d))
            case TemporaryFailure(detail=d, setup_error=setup) if any(x in d for x in self._secrets):
                return TemporaryFailure(scrub(d), setup)
            case PartlySent(accepted=a, temporary=t, permanent=p):
                return PartlySent(a, tuple((r, scrub(x)) for r, x in t), tuple((r, scrub(x)) for r, x in p))
        return outcome


# -- outcomes ---------------------------------------------------------------------------


def _temporary(code: int) -> bool:
    """Whether a refusal with this reply code may pass: anything but a 5xx."""
    return not 500 <= code < 600


def _whole(stage: str, addresses: list[str], code: int, text: str, failures: list) -> Outcome:
    """The outcome when MAIL FROM or DATA is refused: every address in play failed with it."""
    return _settle([], [*((a, text, _temporary(code)) for a in addresses), *failures], stage=stage)


def _settle(accepted: list[str], failures: list[tuple[str, str, bool]], sent_detail: str = "",
            stage: str = "") -> Outcome:
    """The outcome from who took the message and who did not: (address, reply, temporary)."""
    if not failures:
        return Sent(sent_detail)
    temporary = tuple((a, text) for a, text, t in failures if t)
    permanent = tuple((a, text) for a, text, t in failures if not t)
    if accepted or (temporary and permanent):
        return PartlySent(tuple(accepted), temporary, permanent)
    replies = list(dict.fromkeys(text for _, text, _ in failures))
    if stage and len(replies) == 1:
        detail = f"{stage} refused: {replies[0]}"
    else:
        detail = "; ".join(f"{a}: {text}" for a, text, _ in failures)
    return TemporaryFailure(detail) if temporary else PermanentFailure(detail)


def _reply(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return " ".join(f"{code} {text}".split())[:500]


# -- the message on the wire -----------------------------------------------------------

_EOL = re.compile(rb"\r\n|\n|\r")
_BCC = re.compile(rb"bcc[ \t]*:", re.IGNORECASE)
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


def _wire_data(data: bytes, strip_bcc: bool) -> bytes:
    """The DATA section: CRLF line endings, Bcc: fields removed if asked, dots stuffed,
    and the final ".": what smtplib's data() would send, done once per message."""
    text = _EOL.sub(b"\r\n", data)
    if strip_bcc:
        text = _without_bcc(text)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return _LEADING_DOT.sub(b"..", text) + b".\r\n"


def _without_bcc(text: bytes) -> bytes:
    """`text` (CRLF) without its header's Bcc: fields and their continuation lines."""
    end = 0 if text.startswith(b"\r\n") else text.find(b"\r\n\r\n")
    header, rest = (text, b"") if end < 0 else (text[: end + 2], text[end + 2:])
    if not re.search(rb"(?:^|\n)bcc[ \t]*:", header, re.IGNORECASE):
        return text
    kept, dropping = [], False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = _BCC.match(line) is not None
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest


def _address_problem(address: str) -> str | None:
    """Why `address` cannot go in MAIL FROM or RCPT TO as it is, or None if it can."""
    if any(ord(c) < 33 or ord(c) == 127 or c in "<>" for c in address):
        return "it holds spaces, control characters or angle brackets"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in address):
        return "it is not valid UTF-8"
    if len(address.encode()) > 254:
        return "it is longer than 254 octets"
    return None


def _secret_forms(password: str | None) -> tuple[str, ...]:
    if not password:
        return ()
    raw = password.encode()
    return tuple(sorted({password, base64.b64encode(raw).decode()}, key=len, reverse=True))


# -- connections and the pool ------------------------------------------------------------


@dataclass
class _Job:
    sender: str
    recipients: list[str]
    refused: list[tuple[str, str]]
    wire: bytes
    eight_bit: bool


class _Done(Exception):
    """Stop here with this outcome; the connection is not reused."""

    def __init__(self, outcome: Outcome, polite: bool = False):
        self.outcome, self.polite = outcome, polite


class _Keep(_Done):
    """Stop here with this outcome before anything was sent: the connection stays good."""


class _Stale(Exception):
    """A pooled connection turned out dead before this transaction got anywhere."""


class _Smtp(smtplib.SMTP):
    """smtplib.SMTP that takes a reply line cut short by a closed connection for what it is."""

    def getreply(self):
        lines = []
        if self.file is None:
            self.file = self.sock.makefile("rb")
        while True:
            try:
                line = self.file.readline(smtplib._MAXLINE + 1)
            except OSError as e:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"connection lost: {e}")
            if not line.endswith(b"\n"):  # EOF, maybe in mid-line
                self.close()
                raise smtplib.SMTPServerDisconnected("connection closed")
            if len(line) > smtplib._MAXLINE:
                self.close()
                raise smtplib.SMTPResponseException(500, "reply line too long")
            lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
                break
            if line[3:4] != b"-":
                break
        return code, b"\n".join(lines)


class _Connection:
    __slots__ = ("dirty", "features", "idle_since", "messages", "smtp", "stage")

    def __init__(self):
        self.smtp: smtplib.SMTP | None = None
        self.features: dict[str, str] = {}
        self.messages = 0
        self.dirty = False  # a transaction was left open: RSET before the next
        self.idle_since = 0.0
        self.stage = ""

    def usable(self) -> bool:
        """False if the server has spoken or hung up while the connection sat idle."""
        sock = self.smtp.sock if self.smtp else None
        if sock is None:
            return False
        try:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return False
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def shut(self) -> None:
        """Wake whoever waits on this connection (from another thread): the socket fails."""
        sock = self.smtp.sock if self.smtp else None
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # under ssl, straight to the fd
            except (OSError, ValueError):
                pass

    def close(self, quit: bool = False) -> None:
        smtp = self.smtp
        if smtp is None:
            return
        try:
            if quit and smtp.sock is not None:
                smtp.sock.settimeout(2.0)
                smtp.quit()
        except (OSError, smtplib.SMTPException, ValueError):
            pass
        finally:
            smtp.close()


_CLOSED = object()


class _Pool:
    """At most `limit` open connections; idle ones kept most-recent-last and reaped."""

    def __init__(self, limit: int, idle_timeout: float):
        self._limit, self._idle_timeout = limit, idle_timeout
        self._cond = threading.Condition()
        self._idle: list[_Connection] = []
        self._open = 0
        self._closed = False
        self._reaper: threading.Thread | None = None

    def take(self):
        """An idle connection, None when the caller may open a new one, or _CLOSED."""
        with self._cond:
            while True:
                if self._closed:
                    return _CLOSED
                if self._idle:
                    return self._idle.pop()
                if self._open < self._limit:
                    self._open += 1
                    return None
                self._cond.wait()

    def give_back(self, conn: _Connection) -> None:
        with self._cond:
            if not self._closed:
                conn.idle_since = time.monotonic()
                if not self._idle:  # only then may someone be waiting (takers, the reaper)
                    self._cond.notify_all()
                self._idle.append(conn)
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="smtp-reaper", daemon=True)
                    self._reaper.start()
                return
            self._open -= 1
        conn.close(quit=True)

    def discard(self, conn: _Connection, quit: bool = False) -> None:
        conn.close(quit=quit)
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close(quit=True)

    def _reap(self) -> None:
        while True:
            with self._cond:
                expired: list[_Connection] = []
                while not expired:
                    if self._closed:
                        return
                    now = time.monotonic()
                    expired = [c for c in self._idle if c.idle_since + self._idle_timeout <= now]
                    if not expired:
                        self._cond.wait(self._idle[0].idle_since + self._idle_timeout - now if self._idle else None)
                self._idle = [c for c in self._idle if c not in expired]
                self._open -= len(expired)
                self._cond.notify_all()
            for conn in expired:
                conn.close(quit=True)
