"""Deliver over SMTP to a smarthost: pooled sessions, TLS, AUTH and PIPELINING.

Sessions (session.py) are kept open and shared by the delivering threads (pool.py): a
thread takes an idle one (or opens one, up to `max_connections`), runs one mail
transaction on it and gives it back. A session is retired after `max_messages`
transactions and discarded after any error. A pooled session the server has dropped
meanwhile is noticed before or at the first reply of the next transaction (nothing of
that transaction can have been delivered then), and the message goes over a fresh one.

A watchdog thread shuts the socket of any delivery still running after
`message_timeout`, so a server that trickles or stops answering never holds a worker.

Outcomes follow the SMTP reply codes, per recipient: see `SmtpTransport.deliver`.
Nothing is logged here and no detail ever holds the password.
"""

from __future__ import annotations

import base64
import errno
import smtplib
import socket
import ssl

from mailrelayd.deadlines import Deadlines
from mailrelayd.message import Envelope
from mailrelayd.outcome import (
    Outcome,
    PartlySent,
    PermanentFailure,
    Sent,
    TemporaryFailure,
)
from mailrelayd.transports.smtp.pool import Pool, PoolClosed
from mailrelayd.transports.smtp.session import (
    Done,
    Keep,
    Replies,
    Session,
    Smarthost,
    Stale,
)
from mailrelayd.transports.smtp.settings import (
    SmtpSettings,
    SmtpSettingsError,
    address_problem,
)
from mailrelayd.transports.smtp.wire import Job, make_job, reply_text

_NO_DOMAIN = "not sent: the address has no domain (set smtp_default_domain, or use_short_addr)"


class SmtpTransport:
    """Sends each message in one SMTP transaction over a pooled session.

    `message_timeout` bounds one delivery and `max_connections` the sessions open at
    once (the `timeout` and `workers` settings). Header text that is not ASCII goes as it
    is, with SMTPUTF8, to a server that offers SMTPUTF8; to one that does not, as
    encoded-words with `encode_utf8` (utf8_headers = encode), else as it is. SmtpSettingsError
    if it cannot work."""

    def __init__(self, settings: SmtpSettings, *, password: str | None = None, message_timeout: float = 600.0,
                 max_connections: int = 4, encode_utf8: bool = True):
        if max_connections < 1:
            raise SmtpSettingsError("max_connections must be at least 1")
        if not message_timeout > 0:
            raise SmtpSettingsError("message_timeout must be more than 0 seconds")
        self.settings = settings
        self._host = Smarthost(settings, password, message_timeout)
        self._message_timeout, self._max_connections = message_timeout, max_connections
        self._encode_utf8 = encode_utf8
        self._secrets = _secret_forms(password)
        self._refusal: Outcome | None = None
        if settings.user is not None and settings.tls == "none" and not settings.allow_plaintext_auth:
            self._refusal = TemporaryFailure(
                f"refusing to send the SMTP password to {self._host.where} unencrypted: set use_tls to "
                "starttls or implicit (or smtp_allow_plaintext_auth, on a trusted network only)",
                setup_error=True,
            )
        self._pool: Pool[Session] = Pool(max_connections, settings.idle_timeout)
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
        job = self._prepare(data, envelope)
        if not isinstance(job, Job):
            return job
        for _ in range(self._max_connections + 1):
            try:
                conn = self._pool.take()
            except PoolClosed:
                return TemporaryFailure("the SMTP transport is shut down")
            if conn is not None and not conn.usable():
                self._pool.discard(conn)
                continue
            reused = conn is not None
            conn = conn or Session(self._host)
            with self._watchdog.watch(self._message_timeout, conn.shut) as watch:
                try:
                    if not reused:
                        conn.open()
                    replies = conn.transaction(job, reused)
                except Stale:
                    self._pool.discard(conn)
                    continue
                except Keep as kept:  # nothing was sent: the session is as good as before
                    outcome = kept.outcome
                except Done as done:
                    self._pool.discard(conn, quit=done.polite)
                    return self._clean(done.outcome)
                except Exception as e:  # noqa: BLE001 -- any failure on the wire is temporary
                    self._pool.discard(conn)
                    return self._clean(self._failure(e, conn, watch.fired))
                else:
                    outcome = _settle(replies)
                    if replies.hang_up:
                        self._pool.discard(conn)
                        return self._clean(outcome)
            if conn.messages >= self.settings.max_messages:
                self._pool.discard(conn, quit=True)
            else:
                self._pool.give_back(conn)
            return self._clean(outcome)
        return TemporaryFailure(f"{self._host.where} kept dropping connections before answering")

    def close(self) -> None:
        """Close every connection (politely, with QUIT) and stop the helper threads."""
        self._pool.close()
        self._watchdog.stop()

    # -- preparing the message (once, whatever session it goes over) -----------------

    def _prepare(self, data: bytes, envelope: Envelope) -> Job | Outcome:
        """The Job, or the outcome when nothing can be offered to the server."""
        s = self.settings
        sender = s.envelope_from or envelope.sender or ""
        problem = address_problem(sender) if sender else None
        if problem:
            return PermanentFailure(f"envelope sender {sender!r}: {problem}")
        refused: list[tuple[str, str]] = []
        recipients: list[str] = []
        extra = () if envelope.remaining else s.always_bcc  # a retry after a partial send: they had it
        for address in (*envelope.recipients, *extra):
            if "@" not in address and not s.use_short_addr:
                if not s.default_domain:
                    refused.append((address, _NO_DOMAIN))
                    continue
                address = f"{address}@{s.default_domain}"
            problem = address_problem(address)
            if problem:
                refused.append((address, f"not sent: {problem}"))
            elif address not in recipients:
                recipients.append(address)
        if not recipients:
            return _settle(Replies([], [(a, text, False) for a, text in refused]))
        return make_job(sender, recipients, refused, data, self._encode_utf8)

    # -- reporting ---------------------------------------------------------------------

    def _failure(self, error: BaseException, conn: Session, timed_out: bool) -> TemporaryFailure:
        s, stage, where = self.settings, conn.stage, self._host.where
        during = f" during {stage}" if stage else ""
        if timed_out:
            return TemporaryFailure(f"{where} did not finish the message within "
                                    f"message_timeout ({self._message_timeout:g} s){during}")
        cause = error.__context__ if isinstance(error, smtplib.SMTPServerDisconnected) else None
        if isinstance(error, ssl.SSLCertVerificationError):
            return TemporaryFailure(
                f"TLS certificate of {where} not trusted: {error.verify_message} (set smtp_ca_file to "
                "the CA that signed it, or check smtp_server matches the certificate)", setup_error=True)
        if isinstance(error, TimeoutError) or isinstance(cause, TimeoutError):
            limit = s.connect_timeout if stage == "connect" else s.reply_timeout
            return TemporaryFailure(f"{where} timed out{during} (no answer within {limit:g} s)")
        tls_error = error if isinstance(error, ssl.SSLError) else cause
        if isinstance(tls_error, ssl.SSLError):
            return TemporaryFailure(f"TLS error with {where}{during}: {tls_error.reason or tls_error}")
        if isinstance(error, socket.gaierror):
            return TemporaryFailure(f"cannot resolve {s.server}: {error.strerror}",
                                    setup_error=error.errno == socket.EAI_NONAME)
        if isinstance(error, ConnectionRefusedError):
            return TemporaryFailure(f"connection to {where} refused")
        if isinstance(error, smtplib.SMTPNotSupportedError):
            return TemporaryFailure(f"{where}{during}: {error}")
        if isinstance(error, smtplib.SMTPResponseException):
            return TemporaryFailure(f"{where} refused {stage}: {reply_text(error.smtp_code, error.smtp_error)}")
        if isinstance(error, smtplib.SMTPServerDisconnected):
            return TemporaryFailure(f"{where} closed the connection{during}")
        if isinstance(error, OSError):
            reason = error.strerror or errno.errorcode.get(error.errno or 0) or str(error) or type(error).__name__
            return TemporaryFailure(f"network error with {where}{during}: {reason}")
        return TemporaryFailure(f"{type(error).__name__} with {where}{during}: {error}")

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


def _settle(replies: Replies) -> Outcome:
    """The outcome from who took the message and who did not."""
    accepted, failures = replies.accepted, replies.failures
    if not failures:
        return Sent(replies.final)
    temporary = tuple((a, text) for a, text, t in failures if t)
    permanent = tuple((a, text) for a, text, t in failures if not t)
    if accepted or (temporary and permanent):
        return PartlySent(tuple(accepted), temporary, permanent)
    texts = list(dict.fromkeys(text for _, text, _ in failures))
    if replies.stage and len(texts) == 1:
        detail = f"{replies.stage} refused: {texts[0]}"
    else:
        detail = "; ".join(f"{a}: {text}" for a, text, _ in failures)
    return TemporaryFailure(detail) if temporary else PermanentFailure(detail)


def _secret_forms(password: str | None) -> tuple[str, ...]:
    if not password:
        return ()
    raw = password.encode()
    return tuple(sorted({password, base64.b64encode(raw).decode()}, key=len, reverse=True))
