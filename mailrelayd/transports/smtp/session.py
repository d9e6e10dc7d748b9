"""One SMTP session with the smarthost: the protocol's dialogue.

A Session opens one connection (greeting, EHLO, STARTTLS, AUTH, as the settings say)
and then runs one mail transaction at a time on it: MAIL FROM, RCPT TO and DATA, all
sent in one go when the server offers PIPELINING (RFC 2920), then the message in its
wire form (wire.py, which also reads the replies). It reports what the server answered
(Replies); SmtpTransport turns that into an Outcome and decides whether the session
goes back to the pool.

Every read waits at most reply_timeout. `shut`, called from another thread, makes
whatever waits on the socket fail at once. Nothing is logged here.
"""

from __future__ import annotations

import select
import smtplib
import socket
import ssl
from dataclasses import dataclass

from mailrelayd.outcome import Outcome, PermanentFailure, TemporaryFailure
from mailrelayd.transports.smtp.settings import SmtpSettings, SmtpSettingsError
from mailrelayd.transports.smtp.wire import Job, Smtp, reply_text, sock_of


class Smarthost:
    """The server as its sessions need it: the settings, with what is built from them once
    (checked; the TLS context, the EHLO name, the login)."""

    def __init__(self, settings: SmtpSettings, password: str | None, message_timeout: float):
        if settings.server is None:
            raise SmtpSettingsError("smtp_server is not set")
        settings.check(password)
        self.settings, self.server, self.message_timeout = settings, settings.server, message_timeout
        self.where = f"{settings.server}:{settings.port}"
        self.helo = settings.helo or socket.getfqdn()
        context = None if settings.tls == "none" else _tls_context(settings)
        self.implicit_tls = context if settings.tls == "implicit" else None
        self.starttls = context if settings.tls == "starttls" else None
        self.login = None if settings.user is None or password is None else (settings.user, password)


def _tls_context(settings: SmtpSettings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.ca_file:
        try:
            context.load_verify_locations(cafile=settings.ca_file)
        except (OSError, ssl.SSLError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise SmtpSettingsError(f"cannot load smtp_ca_file {settings.ca_file}: {why}") from None
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Replies:
    """What the server said to one transaction: who took the message, who did not."""

    accepted: list[str]
    failures: list[tuple[str, str, bool]]  # (address, reply or reason, temporary)
    final: str = ""  # the reply to the end of DATA
    stage: str = ""  # MAIL FROM, DATA or end of DATA: where the whole message was refused
    hang_up: bool = False  # the server still awaits the data: the session cannot go on


class Done(Exception):
    """Stop here with this outcome; the session is not reused (QUIT first if `polite`)."""

    def __init__(self, outcome: Outcome, polite: bool = False):
        self.outcome, self.polite = outcome, polite


class Keep(Done):
    """Stop here with this outcome before anything was sent: the session stays good."""


class Stale(Exception):
    """A pooled session turned out dead before this transaction got anywhere."""


class Session:
    """One connection to the smarthost; `open` it, then `transaction` once per message."""

    __slots__ = ("dirty", "features", "host", "messages", "smtp", "stage")

    def __init__(self, host: Smarthost):
        self.host = host
        self.smtp = Smtp(local_hostname=host.helo)
        self.features: dict[str, str] = {}
        self.messages = 0  # transactions finished
        self.dirty = False  # a transaction was left open: RSET before the next
        self.stage = ""  # what it was doing (for an error's text)

    def open(self) -> None:
        """Connect, read the greeting, EHLO, then STARTTLS and AUTH as configured.

        Raises Done for a refusal, else the socket's, ssl's and smtplib's errors."""
        host, s, smtp = self.host, self.host.settings, self.smtp
        smtp._host = host.server
        self.stage = "connect"
        sock = socket.create_connection((host.server, s.port), s.connect_timeout)
        smtp.sock = sock
        sock.settimeout(s.reply_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if host.implicit_tls is not None:
            self.stage = "TLS handshake"
            smtp.sock = host.implicit_tls.wrap_socket(sock, server_hostname=host.server)
        self.stage = "greeting"
        code, message = smtp.getreply()
        if code != 220:
            raise Done(TemporaryFailure(f"{host.where} refused the session: {reply_text(code, message)}"), polite=True)
        self.stage = "EHLO"
        smtp.ehlo_or_helo_if_needed()
        if host.starttls is not None:
            if not smtp.has_extn("starttls"):
                raise Done(TemporaryFailure(
                    f"{host.where} does not offer STARTTLS; mail is never sent in plaintext unless "
                    "use_tls = none", setup_error=True), polite=True)
            self.stage = "STARTTLS"
            smtp.starttls(context=host.starttls)
            self.stage = "EHLO after STARTTLS"
            code, message = smtp.ehlo()
            if code != 250:
                raise Done(TemporaryFailure(f"{host.where} refused EHLO after STARTTLS: {reply_text(code, message)}"))
        if host.login is not None:
            self.stage = "AUTH"
            self._authenticate(*host.login)
        self.features = dict(smtp.esmtp_features)

    def _authenticate(self, user: str, password: str) -> None:
        smtp, where = self.smtp, self.host.where
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mechanism is None:
            what = f"only {' '.join(offered)}" if offered else "no AUTH"
            raise Done(TemporaryFailure(
                f"{where} offers {what}; mailrelayd authenticates with PLAIN or LOGIN", setup_error=True),
                polite=True)
        smtp.user, smtp.password = user, password
        try:
            smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
        except smtplib.SMTPAuthenticationError as e:
            reply = reply_text(e.smtp_code, e.smtp_error)
            raise Done(TemporaryFailure(f"{where} refused AUTH {mechanism} as {user!r}: {reply}",
                                        setup_error=not 400 <= e.smtp_code < 500), polite=True) from None
        finally:
            smtp.password = ""

    def transaction(self, job: Job, reused: bool) -> Replies:
        """Offer `job` in one mail transaction; what the server answered.

        Raises Keep (refused before anything was sent), Stale (on a `reused` session
        that had died meanwhile: nothing was delivered), Done, or the socket's errors."""
        smtp, features, where = self.smtp, self.features, self.host.where
        utf8 = "smtputf8" in features
        failures = [(address, text, False) for address, text in job.refused]
        if not job.sender.isascii() and not utf8:
            raise Keep(PermanentFailure(
                f"the envelope sender {job.sender!r} is not ASCII and {where} does not offer SMTPUTF8"))
        recipients = []
        for address in job.recipients:
            if address.isascii() or utf8:
                recipients.append(address)
            else:
                why = f"not sent: the address is not ASCII and {where} does not offer SMTPUTF8"
                failures.append((address, why, False))
        if not recipients:
            return Replies([], failures)
        wire, eight_bit = job.section(utf8)
        params = []
        if "size" in features:
            params.append(f"SIZE={len(wire)}")
        if eight_bit and "8bitmime" in features:
            params.append("BODY=8BITMIME")
        if utf8 and (job.utf8_header or not (job.sender.isascii() and all(a.isascii() for a in recipients))):
            params.append("SMTPUTF8")
        mail = f"MAIL FROM:<{job.sender}>{''.join(' ' + p for p in params)}\r\n".encode()
        rcpts = [f"RCPT TO:<{a}>\r\n".encode() for a in recipients]
        rset = self.dirty
        self.dirty = True  # until the end of DATA is answered
        pipelining = "pipelining" in features
        first = [reused]  # the first reply on a reused session may show it went stale
        sock = sock_of(smtp)

        def send(*lines: bytes) -> None:
            try:
                sock.sendall(b"".join(lines))
            except (BrokenPipeError, ConnectionResetError):
                if first[0]:
                    raise Stale() from None
                raise

        def reply(stage: str) -> tuple[int, str]:
            self.stage = stage
            try:
                code, message = smtp.getreply()
            except smtplib.SMTPServerDisconnected as e:
                if first[0] and not isinstance(e.__context__, TimeoutError):
                    raise Stale() from None
                raise
            if first[0] and code == 421:
                raise Stale()
            first[0] = False
            return code, reply_text(code, message)

        def ask(stage: str, line: bytes) -> tuple[int, str]:
            if not pipelining:
                send(line)
            return reply(stage)

        if pipelining:  # RFC 2920: the whole envelope and DATA in one go, then the replies
            send(*([b"RSET\r\n"] if rset else []), mail, *rcpts, b"DATA\r\n")
        if rset and ask("RSET", b"RSET\r\n")[0] != 250:
            raise Stale()
        mail_code, mail_reply = ask("MAIL FROM", mail)
        if mail_code != 250:
            hang_up = False
            if pipelining:  # the rest was answered too (refused, surely): read it all
                for _ in rcpts:
                    reply("RCPT TO")
                hang_up = reply("DATA")[0] == 354
            return _refused("MAIL FROM", recipients, mail_code, mail_reply, failures, hang_up)
        accepted: list[str] = []
        for address, line in zip(recipients, rcpts, strict=True):
            code, text = ask(f"RCPT TO:<{address}>", line)
            if 200 <= code < 300:
                accepted.append(address)
            else:
                failures.append((address, text, _temporary(code)))
        if not accepted:
            hang_up = pipelining and reply("DATA")[0] == 354  # it awaits data that no one sends
            return Replies([], failures, hang_up=hang_up)
        data_code, data_reply = ask("DATA", b"DATA\r\n")
        if data_code != 354:
            return _refused("DATA", accepted, data_code, data_reply, failures)
        self.stage = "sending the message"
        sock.settimeout(max(self.host.settings.reply_timeout, self.host.message_timeout))
        send(wire)
        sock.settimeout(self.host.settings.reply_timeout)
        code, final = reply("end of DATA")
        self.dirty = False
        self.messages += 1
        if not 200 <= code < 300:
            return _refused("end of DATA", accepted, code, final, failures)
        return Replies(accepted, failures, final)

    def usable(self) -> bool:
        """False if the server has spoken or hung up while the session sat idle."""
        sock = self.smtp.sock
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
        """Wake whoever waits on this session (from another thread): the socket fails."""
        sock = self.smtp.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # under ssl, straight to the fd
            except (OSError, ValueError):
                pass

    def close(self, quit: bool = False) -> None:
        """Close the connection, after a QUIT (waiting at most 2 s) if `quit`."""
        smtp = self.smtp
        try:
            if quit and smtp.sock is not None:
                smtp.sock.settimeout(2.0)
                smtp.quit()
        except (OSError, smtplib.SMTPException, ValueError):
            pass
        finally:
            smtp.close()


def _temporary(code: int) -> bool:
    """Whether a refusal with this reply code may pass: anything but a 5xx."""
    return not 500 <= code < 600


def _refused(stage: str, addresses: list[str], code: int, text: str, failures: list[tuple[str, str, bool]],
             hang_up: bool = False) -> Replies:
    """MAIL FROM or DATA refused: every address in play failed with that reply."""
    return Replies([], [*((a, text, _temporary(code)) for a in addresses), *failures], stage=stage, hang_up=hang_up)
