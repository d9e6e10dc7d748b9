"""The SMTP transport against real servers on 127.0.0.1: aiosmtpd (with real TLS from
trustme certificates and a real AUTH check), small scripted socket servers for broken
peers, and Postfix's smtp-sink for pipelined bulk delivery."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from conftest import UTF8_ENCODED, fossil_message, utf8_message, wait_until
from mailrelayd.message import explicit_envelope, read_envelope
from mailrelayd.outcome import PartlySent, PermanentFailure, Sent, TemporaryFailure
from mailrelayd.transports.smtp import SmtpSettings, SmtpSettingsError, SmtpTransport
from mta import crlf

aiosmtpd = pytest.importorskip("aiosmtpd", reason="aiosmtpd is not installed (pip install aiosmtpd)")
trustme = pytest.importorskip("trustme", reason="trustme is not installed (pip install trustme)")

from aiosmtpd.smtp import SMTP, AuthResult  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
PASSWORD = "s3cret-Pa55"


# -- an aiosmtpd server that records everything and can be told how to answer ------------


@dataclass(frozen=True)
class Mail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    options: tuple[str, ...]
    data: bytes


@dataclass
class Server:
    """aiosmtpd on its own loop and thread; counts connections and records what it is told."""

    tls: ssl.SSLContext | None = None  # offered through STARTTLS
    implicit_tls: ssl.SSLContext | None = None  # TLS from the first byte
    tls_for_auth: bool = True  # (not auth_*: aiosmtpd would take it for a mechanism)
    smtputf8: bool = False
    idle_close: float = 300.0  # aiosmtpd's own idle timeout
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    mails: list[Mail] = field(default_factory=list)
    mail_commands: int = 0
    logins: list[tuple[str, bool]] = field(default_factory=list)
    total: int = 0
    current: int = 0
    most: int = 0

    def start(self) -> Server:
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        server = self

        class Counting(SMTP):
            def connection_made(self, transport):
                if self.transport is None:  # not the STARTTLS re-entry
                    server._count(+1)
                super().connection_made(transport)

            def connection_lost(self, error):
                server._count(-1)
                super().connection_lost(error)

        def factory():
            return Counting(self, hostname="test.example", tls_context=self.tls, authenticator=self._authenticate,
                            auth_require_tls=self.tls_for_auth, enable_SMTPUTF8=self.smtputf8,
                            timeout=self.idle_close, loop=self._loop)

        async def serve():
            return await self._loop.create_server(factory, sock=sock, ssl=self.implicit_tls)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close():
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _count(self, step: int) -> None:
        with self._lock:
            self.current += step
            self.total += step > 0
            self.most = max(self.most, self.current)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == b"relay" and auth_data.password == PASSWORD.encode()
        with self._lock:
            self.logins.append((mechanism, ok))
        return AuthResult(success=ok, handled=False)

    async def handle_MAIL(self, server, session, envelope, address, options):
        with self._lock:
            self.mail_commands += 1
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from, envelope.mail_options = address, list(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        with self._lock:
            self.mails.append(Mail(envelope.mail_from, tuple(envelope.rcpt_tos), tuple(envelope.mail_options),
                                   bytes(envelope.original_content)))
            return f"250 2.0.0 Ok: queued as Q{len(self.mails)}"


def running_servers(kind=Server):
    """For a fixture: yields start(**fields) -> a started `kind`; stops them all afterwards."""
    started = []

    def start(**kwargs):
        server = kind(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def serve():
    """serve(**Server fields) -> a started Server; all stopped at teardown."""
    yield from running_servers(Server)


@pytest.fixture
def transports():
    """transport(port, **SmtpSettings fields and SmtpTransport arguments) -> an SmtpTransport to 127.0.0.1,
    closed at teardown."""
    made = []

    def make(port: int, **kwargs) -> SmtpTransport:
        kwargs.setdefault("use_tls", "none")
        arguments = {k: kwargs.pop(k) for k in ("password", "message_timeout", "max_connections", "encode_utf8")
                     if k in kwargs}
        transport = SmtpTransport(SmtpSettings(server="127.0.0.1", port=port, helo="client.test", **kwargs),
                                  **arguments)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def send(transport: SmtpTransport, data: bytes | None = None, **envelope_changes):
    data = data if data is not None else fossil_message()
    envelope = read_envelope(data)
    if envelope_changes:
        from dataclasses import replace

        envelope = replace(envelope, **envelope_changes)
    return transport.deliver(data, envelope)


# -- scripted servers for peers that misbehave ---------------------------------------------


@contextmanager
def scripted(script):
    """A one-connection server on 127.0.0.1 running script(sock, lines) on its thread; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def run():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        held.append(conn)
        with conn, conn.makefile("rb") as lines:
            try:
                script(conn, lines)
            except OSError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for conn in held:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread.join(10)


def greet(conn, lines, extensions=("8BITMIME",)):
    conn.sendall(b"220 scripted.test ESMTP\r\n")
    assert lines.readline().upper().startswith(b"EHLO")
    conn.sendall(b"250-scripted.test\r\n" + b"".join(f"250-{e}\r\n".encode() for e in extensions[:-1]) + f"250 {extensions[-1]}\r\n".encode())


# -- the message on the wire -----------------------------------------------------------------


MIXED = (b"To: bob@example.com\r\nBcc: hidden@example.net,\n  also-hidden@example.net\r\n"
         b"From: Fossil <noreply@example.org>\nSubject: dots\r\n\r\n"
         b"first\n.\r\n..two\r\n.leading dot\nlast line without newline")


def test_message_arrives_crlf_without_bcc_and_with_dot_lines_intact(serve, transports):
    """What arrives is the message with CRLF line endings, minus its Bcc: field, dot lines unchanged."""
    server = serve()
    outcome = send(transports(server.port), MIXED)
    assert outcome == Sent("250 2.0.0 Ok: queued as Q1")
    [mail] = server.mails
    assert mail.rcpt_tos == ("bob@example.com", "hidden@example.net", "also-hidden@example.net")
    assert mail.mail_from == "noreply@example.org"
    assert mail.data == crlf(MIXED.replace(b"Bcc: hidden@example.net,\n  also-hidden@example.net\r\n", b"")) + b"\r\n"


def test_a_bare_cr_in_the_header_starts_no_header_line(serve, transports):
    """A bare CR in a header field (a forum title can hold one) arrives as a space, not as a line break that would add a field."""
    server = serve()
    message = b"To: bob@example.com\nFrom: noreply@example.org\nSubject: hi\rReply-To: evil@example.net\n\nbody\r.\rmore\n"
    assert send(transports(server.port), message) == Sent("250 2.0.0 Ok: queued as Q1")
    [mail] = server.mails
    header, _, body = mail.data.partition(b"\r\n\r\n")
    assert b"Subject: hi Reply-To: evil@example.net\r\n" in header + b"\r\n"
    assert body == b"body\r\n.\r\nmore\r\n"  # the lone dot stuffed on the wire, whole at the server


def test_explicit_envelope_ignores_header_recipients_and_still_hides_bcc(serve, transports):
    """With recipients given beside the message, exactly those get it, and a Bcc: header never goes out."""
    server = serve()
    data = b"To: bob@example.com\r\nBcc: carol@example.com\r\nSubject: s\r\n\r\nbody\r\n"
    outcome = transports(server.port).deliver(data, explicit_envelope(data, "", ("dave@example.com",)))
    assert isinstance(outcome, Sent)
    [mail] = server.mails
    assert (mail.rcpt_tos, mail.data) == (("dave@example.com",), data.replace(b"Bcc: carol@example.com\r\n", b""))


def test_eight_bit_message_is_declared_8bitmime(serve, transports):
    """A message with 8-bit bytes goes with BODY=8BITMIME when the server offers it."""
    server = serve()
    send(transports(server.port), fossil_message(body="caf\u00e9\r\n"))
    assert server.mails[0].options == ("SIZE=%d" % len(server.mails[0].data + b".\r\n"), "BODY=8BITMIME")


def test_non_ascii_recipient_uses_smtputf8_when_offered(serve, transports):
    """An address that needs SMTPUTF8 is sent with it when the server offers it."""
    server = serve(smtputf8=True)
    assert isinstance(send(transports(server.port), fossil_message(to="j\u00f6rg@example.org")), Sent)
    assert server.mails[0].rcpt_tos == ("j\u00f6rg@example.org",) and "SMTPUTF8" in server.mails[0].options


def test_non_ascii_recipient_without_smtputf8_fails_only_that_recipient(serve, transports):
    """Without SMTPUTF8 a non-ASCII address fails for good; the other recipients still get the message."""
    server = serve()
    outcome = send(transports(server.port), fossil_message(to="j\u00f6rg@example.org, bob@example.com"))
    assert isinstance(outcome, PartlySent) and outcome.accepted == ("bob@example.com",)
    assert [r for r, _ in outcome.permanent] == ["j\u00f6rg@example.org"] and not outcome.temporary
    assert server.mails[0].rcpt_tos == ("bob@example.com",)


def test_utf8_header_goes_as_it_is_with_smtputf8_when_offered(serve, transports):
    """To a server that offers SMTPUTF8, header text that is not ASCII goes as queued, with SMTPUTF8 on MAIL FROM."""
    server = serve(smtputf8=True)
    assert isinstance(send(transports(server.port), utf8_message()), Sent)
    [mail] = server.mails
    assert mail.data == utf8_message() and "SMTPUTF8" in mail.options


def test_utf8_header_goes_as_encoded_words_to_a_server_without_smtputf8(serve, transports):
    """To a server without SMTPUTF8, the Subject and display names go as encoded-words; addresses, ASCII fields
    and the body are untouched."""
    server = serve()
    assert isinstance(send(transports(server.port), utf8_message()), Sent)
    [mail] = server.mails
    assert mail.data == UTF8_ENCODED and "SMTPUTF8" not in mail.options
    assert (mail.mail_from, mail.rcpt_tos) == ("noreply@example.org", ("zoe@example.com",))


def test_keep_sends_utf8_header_as_it_is_to_a_server_without_smtputf8(serve, transports):
    """With utf8_headers = keep the header's bytes go as queued even to a server without SMTPUTF8."""
    server = serve()
    assert isinstance(send(transports(server.port, encode_utf8=False), utf8_message()), Sent)
    [mail] = server.mails
    assert mail.data == utf8_message() and "SMTPUTF8" not in mail.options


def test_non_ascii_address_without_smtputf8_is_a_permanent_failure_saying_why(serve, transports):
    """A message whose only recipient is not ASCII fails for good at a server without SMTPUTF8, which hears nothing."""
    server = serve()
    outcome = send(transports(server.port), utf8_message(to="J\u00f6rg <j\u00f6rg@example.org>"))
    assert isinstance(outcome, PermanentFailure)
    assert outcome.detail == ("j\u00f6rg@example.org: not sent: the address is not ASCII and "
                              f"127.0.0.1:{server.port} does not offer SMTPUTF8")
    assert server.mail_commands == 0


# -- envelope options ------------------------------------------------------------------------


def test_always_bcc_is_an_envelope_recipient_but_not_in_the_header(serve, transports):
    """smtp_always_bcc addresses get the message, and no header names them."""
    server = serve()
    send(transports(server.port, always_bcc=("archive@example.org",)))
    [mail] = server.mails
    assert mail.rcpt_tos == ("bob@example.com", "archive@example.org")
    assert b"archive" not in mail.data


def test_default_domain_is_appended_to_bare_recipients(serve, transports):
    """A recipient without a domain gets smtp_default_domain; full addresses are left alone."""
    server = serve()
    send(transports(server.port, default_domain="example.net"), fossil_message(to="bob, carol@example.com"))
    assert server.mails[0].rcpt_tos == ("bob@example.net", "carol@example.com")


def test_use_short_addr_sends_bare_recipients_unchanged(serve, transports):
    """With use_short_addr a recipient without a domain goes to the server as it is."""
    server = serve()
    send(transports(server.port, use_short_addr=True), fossil_message(to="bob"))
    assert server.mails[0].rcpt_tos == ("bob",)


def test_bare_recipient_without_domain_option_fails_for_that_recipient(serve, transports):
    """Neither option: a recipient without a domain is a permanent failure, the others are sent to."""
    server = serve()
    outcome = send(transports(server.port), fossil_message(to="bob, carol@example.com"))
    assert isinstance(outcome, PartlySent) and outcome.accepted == ("carol@example.com",)
    assert [r for r, _ in outcome.permanent] == ["bob"]
    assert server.mails[0].rcpt_tos == ("carol@example.com",)


def test_smtp_from_overrides_the_envelope_sender(serve, transports):
    """smtp_from is the MAIL FROM whatever the message says."""
    server = serve()
    send(transports(server.port, envelope_from="bounces@example.org"))
    assert server.mails[0].mail_from == "bounces@example.org"


def test_no_sender_is_the_null_sender(serve, transports):
    """Without smtp_from and without a sender in the envelope, MAIL FROM is <>."""
    server = serve()
    assert isinstance(send(transports(server.port), sender=None), Sent)
    assert server.mails[0].mail_from == "<>"  # aiosmtpd shows the null sender so


def test_address_with_line_break_is_refused_before_the_wire(serve, transports):
    """A recipient that could smuggle an SMTP command is refused for good and never sent."""
    server = serve()
    outcome = send(transports(server.port), recipients=("bob@example.com\r\nRCPT TO:<x@evil.example>",))
    assert isinstance(outcome, PermanentFailure)
    assert server.total == 0


# -- TLS -----------------------------------------------------------------------------------


def test_starttls_with_verified_certificate(serve, transports, server_tls, ca_file):
    """STARTTLS against a certificate from the private CA in smtp_ca_file delivers."""
    server = serve(tls=server_tls)
    assert isinstance(send(transports(server.port, use_tls="starttls", ca_file=ca_file)), Sent)
    assert len(server.mails) == 1


def test_implicit_tls(serve, transports, server_tls, ca_file):
    """use_tls = implicit speaks TLS from the first byte (port 465 style)."""
    server = serve(implicit_tls=server_tls)
    assert isinstance(send(transports(server.port, use_tls="implicit", ca_file=ca_file)), Sent)
    assert len(server.mails) == 1


def test_untrusted_certificate_is_refused(serve, transports, server_tls):
    """A certificate from a CA the client does not trust is a setup error, and nothing is sent."""
    server = serve(tls=server_tls)
    outcome = send(transports(server.port, use_tls="starttls"))
    assert isinstance(outcome, TemporaryFailure) and outcome.setup_error
    assert "not trusted" in outcome.detail
    assert server.mail_commands == 0


def test_untrusted_certificate_is_accepted_when_insecure(serve, transports, server_tls):
    """smtp_insecure turns verification off: the same server is then used."""
    server = serve(implicit_tls=server_tls)
    assert isinstance(send(transports(server.port, use_tls="implicit", insecure=True)), Sent)


def test_starttls_required_but_not_offered(serve, transports):
    """A server without STARTTLS gets no mail at all when STARTTLS is required."""
    server = serve()
    outcome = send(transports(server.port, use_tls="starttls"))
    assert isinstance(outcome, TemporaryFailure) and "STARTTLS" in outcome.detail
    assert server.mail_commands == 0 and server.total == 1


# -- AUTH ----------------------------------------------------------------------------------


def test_auth_with_right_password(serve, transports, server_tls, ca_file):
    """The right credentials over STARTTLS authenticate, and the message is sent."""
    server = serve(tls=server_tls)
    transport = transports(server.port, use_tls="starttls", ca_file=ca_file, user="relay", password=PASSWORD)
    assert isinstance(send(transport), Sent)
    assert server.logins == [("PLAIN", True)]


def test_auth_with_wrong_password_is_a_setup_error(serve, transports, server_tls, ca_file):
    """A refused password defers the mail as a setup error and never shows the password."""
    server = serve(tls=server_tls)
    transport = transports(server.port, use_tls="starttls", ca_file=ca_file, user="relay", password="wrong-pw")
    outcome = send(transport)
    assert isinstance(outcome, TemporaryFailure) and outcome.setup_error
    assert "535" in outcome.detail and "wrong-pw" not in outcome.detail
    assert server.mail_commands == 0


def test_auth_refused_over_plaintext(serve, transports):
    """Without TLS the password is not sent unless smtp_allow_plaintext_auth."""
    server = serve(tls_for_auth=False)
    outcome = send(transports(server.port, user="relay", password=PASSWORD))
    assert isinstance(outcome, TemporaryFailure) and outcome.setup_error
    assert server.total == 0 and server.logins == []


def test_auth_over_plaintext_when_allowed(serve, transports):
    """smtp_allow_plaintext_auth lets AUTH go over a plain connection."""
    server = serve(tls_for_auth=False)
    transport = transports(server.port, user="relay", password=PASSWORD, allow_plaintext_auth=True)
    assert isinstance(send(transport), Sent)
    assert server.logins == [("PLAIN", True)]


def test_repr_hides_the_password():
    """The password never appears in the repr of the settings or of the transport."""
    settings = SmtpSettings(server="x", user="relay")
    transport = SmtpTransport(settings, password=PASSWORD)
    transport.close()
    assert PASSWORD not in repr(settings) + repr(transport)


def test_unknown_tls_mode_is_refused_at_start():
    """A use_tls value that is not a mode stops start-up instead of deferring mail."""
    with pytest.raises(SmtpSettingsError):
        SmtpTransport(SmtpSettings(server="x", use_tls="yes"))


# -- replies -------------------------------------------------------------------------------


def test_mail_from_4xx_is_temporary(serve, transports):
    """A 4xx answer to MAIL FROM defers the message with the server's words."""
    server = serve(mail_reply="451 4.7.1 Greylisted, try later")
    outcome = send(transports(server.port))
    assert outcome == TemporaryFailure("MAIL FROM refused: 451 4.7.1 Greylisted, try later")


def test_data_5xx_is_permanent(serve, transports):
    """A 5xx answer to the message data fails it for good."""
    server = serve(data_reply="554 5.7.1 Rejected as spam")
    outcome = send(transports(server.port))
    assert outcome == PermanentFailure("end of DATA refused: 554 5.7.1 Rejected as spam")


def test_per_recipient_refusals_are_partly_sent(serve, transports):
    """One 550, one 451, one 250: PartlySent with exactly those, and one copy for the accepted one."""
    server = serve(rcpt_replies={"gone@example.com": "550 5.1.1 No such user",
                                 "busy@example.com": "451 4.2.0 Mailbox busy"})
    outcome = send(transports(server.port),
                   fossil_message(to="gone@example.com, busy@example.com, ok@example.com"))
    assert outcome == PartlySent(accepted=("ok@example.com",),
                                 temporary=(("busy@example.com", "451 4.2.0 Mailbox busy"),),
                                 permanent=(("gone@example.com", "550 5.1.1 No such user"),))
    assert [m.rcpt_tos for m in server.mails] == [("ok@example.com",)]


def test_all_recipients_5xx_is_permanent(serve, transports):
    """Every recipient refused for good fails the message, naming each."""
    server = serve(rcpt_replies={"a@example.com": "550 5.1.1 No such user",
                                 "b@example.com": "553 5.1.3 Bad address"})
    outcome = send(transports(server.port), fossil_message(to="a@example.com, b@example.com"))
    assert outcome == PermanentFailure("a@example.com: 550 5.1.1 No such user; b@example.com: 553 5.1.3 Bad address")
    assert server.mails == []


def test_all_recipients_4xx_is_temporary(serve, transports):
    """Every recipient refused for now defers the whole message."""
    server = serve(rcpt_replies={"bob@example.com": "450 4.2.1 Slow down"})
    assert send(transports(server.port)) == TemporaryFailure("bob@example.com: 450 4.2.1 Slow down")


def test_connection_refused_is_temporary(transports):
    """Nobody listening is a temporary failure."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    outcome = send(transports(port))
    assert isinstance(outcome, TemporaryFailure) and "refused" in outcome.detail


def test_server_closing_mid_message_is_temporary(transports):
    """A server that hangs up in the middle of the data leaves the message for another try."""

    def script(conn, lines):
        greet(conn, lines)
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go on\r\n"):
            lines.readline()
            conn.sendall(reply)
        lines.readline()  # one line of the message, then gone

    with scripted(script) as port:
        outcome = send(transports(port))
    assert isinstance(outcome, TemporaryFailure) and "closed the connection" in outcome.detail


def test_silent_server_times_out_within_reply_timeout(transports):
    """A server that accepts the connection and never speaks costs reply_timeout, then defers."""
    done = threading.Event()
    with scripted(lambda conn, lines: done.wait(10)) as port:
        started = time.monotonic()
        outcome = send(transports(port, reply_timeout=1.0))
        elapsed = time.monotonic() - started
        done.set()
    assert isinstance(outcome, TemporaryFailure) and "timed out" in outcome.detail
    assert 0.9 <= elapsed < 3


def test_trickling_server_is_cut_off_at_message_timeout(transports):
    """A server answering one byte at a time never holds a delivery past message_timeout."""
    stop = threading.Event()

    def script(conn, lines):
        while not stop.wait(0.2):
            conn.sendall(b"2")

    with scripted(script) as port:
        started = time.monotonic()
        outcome = send(transports(port, reply_timeout=1.0, message_timeout=1.5))
        elapsed = time.monotonic() - started
        stop.set()
    assert isinstance(outcome, TemporaryFailure) and "message_timeout" in outcome.detail
    assert 1.4 <= elapsed < 3


# -- connections ---------------------------------------------------------------------------


def test_twenty_messages_share_one_connection(serve, transports):
    """Consecutive messages reuse the same connection."""
    server = serve()
    transport = transports(server.port)
    assert all(isinstance(send(transport), Sent) for _ in range(20))
    assert (server.total, len(server.mails)) == (1, 20)


def test_new_connection_after_max_messages(serve, transports):
    """After smtp_max_messages a connection is closed and a new one opened."""
    server = serve()
    transport = transports(server.port, max_messages=5)
    assert all(isinstance(send(transport), Sent) for _ in range(20))
    assert (server.total, len(server.mails)) == (4, 20)


def test_concurrent_deliveries_use_at_most_max_connections(serve, transports):
    """Four threads sending 100 messages never have more than max_connections open."""
    server = serve()
    transport = transports(server.port, max_connections=4)
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda i: send(transport, fossil_message(subject=f"m{i}")), range(100)))
    assert all(isinstance(o, Sent) for o in outcomes)
    assert len(server.mails) == 100 and server.most <= 4


def test_idle_connections_are_closed(serve, transports):
    """A pooled connection idle for idle_timeout is closed by the transport."""
    server = serve()
    send(transports(server.port, idle_timeout=0.2))
    wait_until(lambda: server.total == 1 and server.current == 0, timeout=5, what="the idle connection to close")


def test_connection_dropped_by_the_server_is_replaced(serve, transports):
    """A pooled connection the server closed meanwhile is replaced, and the message still goes."""
    server = serve(idle_close=0.3)
    transport = transports(server.port)
    send(transport)
    wait_until(lambda: server.current == 0, timeout=5, what="the server to drop the connection")
    assert isinstance(send(transport), Sent)
    assert (server.total, len(server.mails)) == (2, 2)


def test_pipelining_sends_the_envelope_before_reading_replies(transports):
    """With PIPELINING offered, MAIL, RCPT and DATA go out before any reply is awaited."""
    received = []

    def script(conn, lines):
        greet(conn, lines, extensions=("PIPELINING", "8BITMIME"))
        commands = []
        while not commands or commands[-1] != b"DATA\r\n":  # no reply until DATA: a lock-step client stalls
            commands.append(lines.readline())
        conn.sendall(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go on\r\n")
        data = b"".join(iter(lines.readline, b".\r\n"))
        received.append((commands, data))
        conn.sendall(b"250 2.0.0 queued\r\n")
        lines.readline()

    with scripted(script) as port:
        outcome = send(transports(port, reply_timeout=2.0), fossil_message(to="a@example.com, b@example.com"))
    assert outcome == Sent("250 2.0.0 queued")
    [(commands, data)] = received
    assert commands == [b"MAIL FROM:<noreply@example.org>\r\n", b"RCPT TO:<a@example.com>\r\n",
                        b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n"]


@pytest.fixture
def smtp_sink_process(tmp_path):
    """Postfix's smtp-sink on a free port, counting sessions and messages on stdout."""
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip("Postfix's smtp-sink is not installed (apt-get install postfix)")
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    out = open(tmp_path / "smtp-sink.out", "w+b")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([SMTP_SINK, *user, "-c", f"127.0.0.1:{port}", "100"], stdout=out, stderr=out)

    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return proc.poll() is not None

    wait_until(listening, timeout=10, what="smtp-sink to listen")

    def counters() -> str:
        proc.terminate()
        proc.wait(10)
        out.seek(0)
        return out.read().decode().replace("\r", "\n").split()[-3:]

    yield port, counters
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)
    out.close()


def test_two_hundred_messages_pipelined_to_postfix_smtp_sink(smtp_sink_process, transports):
    """Postfix's smtp-sink (which offers PIPELINING) takes 200 messages over two pooled connections."""
    port, counters = smtp_sink_process
    transport = transports(port)
    outcomes = [send(transport, fossil_message(subject=f"m{i}")) for i in range(200)]
    transport.close()
    assert all(isinstance(o, Sent) for o in outcomes)
    assert counters()[1:] == ["quit=2", "mesg=200"]  # (sess also counts the fixture's probe)
