"""The Maildir transport: what would be sent, and its envelope, as files in a real Maildir."""

from dataclasses import replace

from mailrelayd.message import explicit_envelope, read_envelope, to_lf
from mailrelayd.outcome import Sent
from mailrelayd.transports.maildir import MaildirTransport
from conftest import UTF8_ENCODED, fossil_message, run_cli, utf8_message


def deliver(tmp_path, data: bytes, envelope) -> bytes:
    """Deliver into tmp_path/Maildir and return the one file written into new/."""
    assert isinstance(MaildirTransport(tmp_path / "Maildir").deliver(data, envelope), Sent)
    [written] = (tmp_path / "Maildir" / "new").iterdir()
    return written.read_bytes()


def test_envelope_lines_come_before_the_message(tmp_path):
    """Return-Path: names the envelope sender and X-Original-To:/Delivered-To: each recipient, above the message as it would be piped."""
    data = fossil_message(to="bob@example.com")
    written = deliver(tmp_path, data, read_envelope(data))
    assert written == (b"Return-Path: <noreply@example.org>\nX-Original-To: bob@example.com\n"
                       b"Delivered-To: bob@example.com\n" + to_lf(data))


def test_recipients_given_beside_the_message_are_shown(tmp_path):
    """Recipients that mailrelayd-sendmail recorded beside the message (Bcc copies, in no header) each get their lines."""
    data = b"To: list@example.org\nSubject: minutes\n\nbody\n"
    envelope = explicit_envelope(data, "trac@example.org", ("alice@example.org", "hidden@example.net"))
    written = deliver(tmp_path, data, envelope)
    assert written.startswith(b"Return-Path: <trac@example.org>\n"
                              b"X-Original-To: alice@example.org\nDelivered-To: alice@example.org\n"
                              b"X-Original-To: hidden@example.net\nDelivered-To: hidden@example.net\nTo: ")


def test_header_text_that_is_not_ascii_is_shown_as_it_would_be_piped(tmp_path):
    """By default the Maildir shows the Subject and display names as the encoded-words the pipe would hand on."""
    written = deliver(tmp_path, utf8_message(), read_envelope(utf8_message()))
    assert written.endswith(b"Delivered-To: zoe@example.com\n" + to_lf(UTF8_ENCODED))


def test_utf8_headers_keep_from_the_command_line_shows_the_bytes_as_queued(sqlite_harness, tmp_path):
    """`--utf8-headers keep` reaches the transport: a drain into a Maildir writes the header's bytes as queued."""
    sqlite_harness.enqueue(utf8_message())
    result = run_cli("--drain", *sqlite_harness.cli_args, "--maildir", str(tmp_path / "out"), "--utf8-headers", "keep")
    [written] = (tmp_path / "out" / "new").iterdir()
    assert result.returncode == 0 and written.read_bytes().endswith(b"\n" + to_lf(utf8_message()))


def test_no_envelope_sender_writes_no_return_path(tmp_path):
    """With no sender passed on (envelope_from = none), no Return-Path: is made up."""
    data = fossil_message(to="bob@example.com")
    written = deliver(tmp_path, data, replace(read_envelope(data), sender=None))
    assert written.startswith(b"X-Original-To: bob@example.com\nDelivered-To: bob@example.com\nTo: ")


def test_hostile_envelope_cannot_add_a_header_line(tmp_path):
    """A sender or recipient from the queue that is not a plain address is left out: nothing it holds becomes a header line."""
    data = b"To: bob@example.com\nSubject: hi\n\nbody\n"
    hostile = ("a@example.org\nX-Injected: yes", "b@example.org\r\nBcc: evil@example.net", "c@example.org> x",
               "\u2028d@example.org", "ok@example.org")
    envelope = replace(read_envelope(data), sender="s@example.org\nX-Injected: yes", recipients=hostile)
    written = deliver(tmp_path, data, envelope)
    assert written == b"X-Original-To: ok@example.org\nDelivered-To: ok@example.org\n" + data
