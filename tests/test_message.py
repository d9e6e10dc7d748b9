"""Reading envelopes from Fossil-style messages."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelayd.message import MalformedMessage, header_block, read_envelope, safe_address, to_lf
from conftest import fossil_message


def test_recipients_come_from_to_cc_and_bcc():
    """Every address in To:, Cc: and Bcc: is a recipient."""
    data = b"To: a@x.org, B <b@x.org>\r\nCc: c@x.org\r\nBcc: d@x.org\r\nSubject: s\r\n\r\nbody"
    assert read_envelope(data).recipients == ("a@x.org", "b@x.org", "c@x.org", "d@x.org")


def test_sender_prefers_sender_header_over_from():
    """The envelope sender is Sender: when present, as Fossil sets it beside a display From:."""
    data = b'To: a@x.org\r\nFrom: "Proj" <proj@x.org>\r\nSender: bounce@x.org\r\n\r\nbody'
    envelope = read_envelope(data)
    assert (envelope.sender, envelope.from_address) == ("bounce@x.org", "proj@x.org")


def test_sender_falls_back_to_from():
    """Without Sender:, the From: address is the envelope sender."""
    assert read_envelope(fossil_message(sender="noreply@example.org")).sender == "noreply@example.org"


def test_option_like_sender_is_never_offered():
    """A From: address starting with '-' would be read as a sendmail option, so it is dropped."""
    assert read_envelope(b"To: a@x.org\r\nFrom: -oQ/tmp/x@evil.org\r\n\r\nb").sender is None


def test_message_without_header_is_malformed():
    """Data that does not start with a header field cannot be mailed."""
    with pytest.raises(MalformedMessage, match="no header"):
        read_envelope(b"hello there\r\n\r\nbody")


def test_message_without_recipients_is_malformed():
    """A header with no To:, Cc: or Bcc: address gives nobody to send to."""
    with pytest.raises(MalformedMessage, match="no recipients"):
        read_envelope(b"Subject: lonely\r\nFrom: a@x.org\r\n\r\nbody")


def test_encoded_subject_is_decoded_for_logs():
    """An RFC 2047 subject is logged as readable text."""
    data = b"To: a@x.org\r\nSubject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n\r\nb"
    assert read_envelope(data).subject == "Grüße"


def test_header_ends_at_first_blank_line_with_mixed_endings():
    """Fossil mixes LF and CRLF lines; the header still ends at the first blank line."""
    assert header_block(b"To: a@x.org\nSubject: s\r\n\r\nTo: not@header.org") == b"To: a@x.org\nSubject: s"


def test_to_lf_turns_crlf_into_lf_only():
    """CRLF becomes LF; a lone CR or LF is left as it is."""
    assert to_lf(b"a\r\nb\nc\rd\r\n") == b"a\nb\nc\rd\n"


@given(st.binary(max_size=300))
def test_any_bytes_either_parse_or_are_refused_cleanly(data):
    """Hostile input never raises anything but MalformedMessage."""
    try:
        envelope = read_envelope(data)
    except MalformedMessage:
        return
    assert envelope.recipients and envelope.size == len(data)
    assert envelope.sender is None or safe_address(envelope.sender) == envelope.sender


@given(st.text(max_size=60))
def test_safe_addresses_never_start_with_dash_or_hold_spaces(text):
    """Whatever safe_address accepts is one plain word with an @ and no leading '-'."""
    address = safe_address(text)
    if address is not None:
        assert not address.startswith("-") and "@" in address and not any(c.isspace() for c in address)


@settings(max_examples=500)
@given(st.lists(st.text(alphabet="ab@.<>\" ,-()", max_size=14), max_size=3))
def test_quick_address_parsing_agrees_with_the_email_package(values):
    """The fast path for plain address lists finds exactly what email.utils.getaddresses finds."""
    from email.utils import getaddresses

    from mailrelayd.message import _addresses

    assert _addresses(values) == [a for v in values for _, a in getaddresses([v]) if a.strip()]


_ADDRESS_PARTS = st.sampled_from(["a", "Bob", "x9", "é", "ü", ".", "@", "-", "_", "+", "|", "/", "!", "#", "'",
                                  "=", "~", "[", "]", "IPv6:", "::1", "192.0.2.1", ":", ";", ",", "<", ">", "(",
                                  ")", '"', "\\", " ", "\t", "\n", "\x00", "\x7f", "\u2028", "\udcff", "org"])


@settings(max_examples=2000)
@given(st.lists(_ADDRESS_PARTS, max_size=8).map("".join) | st.text(max_size=40))
def test_a_plain_address_is_one_bare_address_to_the_email_package(text):
    """Whatever the one plain-address rule accepts, email.utils reads as exactly that one address, no name."""
    from email.utils import getaddresses, parseaddr

    from mailrelayd.inject import is_plain_address

    if is_plain_address(text):
        assert parseaddr(text) == ("", text)
        assert getaddresses([text]) == [("", text)]
        assert not text.startswith(("-", "|", "/")) and text.isprintable() and " " not in text
    assert safe_address(text) in (None, text)
    assert safe_address(text) is None or is_plain_address(text) and "@" in text


_HEADER_PARTS = st.sampled_from([
    "a@x.org", "Bob <b@x.org>", '"Q, R" <q@x.org>', "(", ")", "<", ">", '"', ",", ";", ":", "g:", "\\", "@",
    "=?utf-8?b?A?=", "=?utf-8?q?=E9?=", "=?x-unknown?q?a?=", "=?utf-8?b?", "?=", " ", "\t", "\r\n ", "\x00",
    "\x1b]52;c;", "\u2028", "\u202e", "é", "|cmd@x.org", "-oQ@x.org", "/etc/x@y", "a" * 50,
])
_HEADER_VALUE = st.lists(_HEADER_PARTS, max_size=30).map("".join)


@settings(max_examples=800)
@given(to=_HEADER_VALUE, cc=_HEADER_VALUE, subject=_HEADER_VALUE, sender=_HEADER_VALUE,
       nesting=st.integers(0, 3000))
def test_hostile_headers_only_ever_raise_malformed_message(to, cc, subject, sender, nesting):
    """Whatever a forum user or a jail writes in To:, Cc:, Subject: or From:, parsing raises only MalformedMessage, and every recipient it returns is plain."""
    from mailrelayd.inject import is_plain_address

    header = (f"To: {'(' * nesting}{to}{')' * nesting}\r\nCc: {cc}\r\nSubject: {subject}\r\nFrom: {sender}\r\n"
              "\r\nbody\r\n")
    try:
        envelope = read_envelope(header.encode("utf-8", "surrogateescape"))
    except MalformedMessage:
        return
    assert all(is_plain_address(r) for r in envelope.recipients)
    assert envelope.sender is None or is_plain_address(envelope.sender, need_domain=True)


def test_an_invalid_encoded_word_in_a_subject_is_kept_as_written():
    """A forum title such as =?utf-8?b?A?= (copied by Fossil into Subject:) is a subject, not an error."""
    envelope = read_envelope(b"To: a@x.org\r\nSubject: [proj] =?utf-8?b?A?=\r\n\r\nbody\r\n")
    assert envelope.subject == "[proj] =?utf-8?b?A?=" and envelope.recipients == ("a@x.org",)


@pytest.mark.parametrize("header", [
    b"To: " + b"(" * 5000 + b"a@x.org" + b")" * 5000,  # RecursionError in the email package
    b"To: " + b"g:" * 2000 + b"a@x.org;",
    b"To: |/bin/sh@x.org",  # a pipe to a command
    b"To: " + b"a@x.org, " * 8000,  # a header over MAX_HEADER
])
def test_headers_the_email_package_cannot_take_are_malformed(header):
    """Deep nesting, a command for an address and an oversized header are refused as MalformedMessage."""
    with pytest.raises(MalformedMessage):
        read_envelope(header + b"\r\nSubject: s\r\n\r\nbody\r\n")
