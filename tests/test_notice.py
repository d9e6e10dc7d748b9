"""Failure notices to the administrator: any text from a queue is escaped, never raised on."""

from email import message_from_bytes
from email.policy import default

from conftest import TERMINAL_UNSAFE, hostile_text
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelayd.message import Envelope
from mailrelayd.notice import failure_notice


def _envelope(subject: str, recipients: tuple[str, ...]) -> Envelope:
    return Envelope(sender=None, recipients=recipients, from_address="", to_header="", subject=subject, size=1)


def _read(data: bytes) -> tuple[str, list[str]]:
    """The notice's Subject and body lines, as a mail client shows them."""
    msg = message_from_bytes(data, policy=default)
    return str(msg["Subject"]), msg.get_content().replace("\r\n", "\n").split("\n")


@settings(max_examples=300, deadline=None)
@given(queue=hostile_text(), ident=st.one_of(st.integers(), hostile_text()), subject=hostile_text(),
       recipients=st.lists(hostile_text(), max_size=3), reason=hostile_text(200))
def test_a_notice_is_built_from_any_text_and_shows_none_of_its_controls(queue, ident, subject, recipients, reason):
    """Whatever queue, id, subject, recipients and reason hold, the notice is built, and its Subject and body
    lines hold no control, separator, bidi or undecodable character."""
    data = failure_notice("admin@example.org", queue, ident, _envelope(subject, tuple(recipients)), reason, now=0)
    shown_subject, body = _read(data)
    assert shown_subject.startswith("[mailrelayd] undeliverable: ")
    assert not TERMINAL_UNSAFE.search(shown_subject)
    assert not [line for line in body if TERMINAL_UNSAFE.search(line)]


def test_a_notice_shows_escape_sequences_and_bytes_as_visible_escapes():
    """ESC, CR, U+2028, a bidi override and bytes that were not UTF-8 appear in a notice as visible escapes."""
    data = failure_notice("admin@example.org", "/srv/spool\x1b[2J", "bad\udcffname.email",
                          _envelope("\x1b]52;c;aGk=\x07\rA\u2028\u202eB", ("b\udcffob@example.com",)),
                          "sendmail said \x1b[31mno", now=0)
    subject, body = _read(data)
    assert subject == "[mailrelayd] undeliverable: \\x1b]52;c;aGk=\\x07 A \\u202eB"
    assert "Queue:      /srv/spool\\x1b[2J" in body
    assert "Message:    bad\\xffname.email" in body
    assert "Recipients: b\\xffob@example.com" in body
    assert "Subject:    \\x1b]52;c;aGk=\\x07 A \\u202eB" in body
    assert "Reason:     sendmail said \\x1b[31mno" in body
