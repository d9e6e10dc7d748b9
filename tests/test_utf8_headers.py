"""Header text that is not ASCII as RFC 2047 encoded-words: what mail clients decode it to,
and what never changes (addresses, the body, ASCII fields, the header's lines)."""

from __future__ import annotations

import base64
import quopri
import re
from email import message_from_bytes
from email.header import decode_header, make_header
from email.policy import default

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import hostile_text
from mailrelayd.utf8_headers import encode_headers

BODY = b"caf\xc3\xa9 \xff\xfe\x00 =?utf-8?q?x?=\r\nFrom: not@a.header\r\n"
ENCODED_WORD = re.compile(r"=\?utf-8\?[qb]\?[^?\s]*\?=")


def split(data: bytes) -> tuple[list[bytes], bytes]:
    """The header's fields (lines joined) and the rest, as encode_headers sees the header end."""
    fields, pos = [], 0
    for line in re.findall(rb"[^\n]*\n|[^\n]+$", data):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif re.match(rb"[!-9;-~]+[ \t]*:", line):
            fields.append(line)
        else:
            break
        pos += len(line)
    return fields, data[pos:]


def names(fields: list[bytes]) -> list[bytes]:
    return [f.split(b":", 1)[0].strip().lower() for f in fields]


def lines_of(fields: list[bytes]) -> list[str]:
    return [line for f in fields for line in re.split(r"\r?\n", f.decode("utf-8", "surrogateescape")) if line]


def word_text(word: str) -> str:
    """The text of one encoded-word, which must be whole UTF-8 on its own."""
    _, _, kind, payload, _ = word.split("?")
    if kind == "b":
        return base64.b64decode(payload).decode()
    return quopri.decodestring(payload.replace("_", " ")).decode()


def decoded(value: str) -> str:
    """A value as the email package's older API decodes it (decode_header, make_header)."""
    return str(make_header(decode_header(value)))


def shown(data: bytes, name: str) -> str:
    """A field as a mail client shows it (the email package's header registry)."""
    return str(message_from_bytes(data, policy=default)[name])


# -- what stays as it is ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(header=st.text(st.characters(max_codepoint=127, exclude_characters="\r\n"), max_size=200),
       body=st.binary(max_size=200))
def test_message_with_an_ascii_header_comes_out_byte_identical(header, body):
    """A message whose header is ASCII comes out exactly as it went in, whatever its body holds."""
    data = b"Subject: " + header.encode() + b"\r\n\r\n" + body
    assert encode_headers(data) is data


def test_fossil_message_keeps_its_ascii_fields_addresses_and_body():
    """Only the Subject and the display name change; To:, the From: address, every ASCII field and the body stay."""
    data = ("To: <bob@example.com>\r\nSubject: Caf\u00e9 opening\r\nFrom: J\u00f6rg <noreply@example.org>\r\n"
            "Date: Mon, 30 Nov 2026 07:31:26 +0000\r\nMIME-Version: 1.0\r\n\r\n").encode() + BODY
    out = encode_headers(data)
    assert out == (b"To: <bob@example.com>\r\nSubject: =?utf-8?b?Q2Fmw6k=?= opening\r\n"
                   b"From: =?utf-8?b?SsO2cmc=?= <noreply@example.org>\r\n"
                   b"Date: Mon, 30 Nov 2026 07:31:26 +0000\r\nMIME-Version: 1.0\r\n\r\n" + BODY)


def test_non_ascii_address_stays_byte_for_byte():
    """An address that is not ASCII cannot be encoded: it stays, while its display name is encoded."""
    data = "To: J\u00f6rg <j\u00f6rg@example.org>, m\u00fcller@example.org\n\nb".encode()
    out = encode_headers(data)
    assert out == "To: =?utf-8?b?SsO2cmc=?= <j\u00f6rg@example.org>, m\u00fcller@example.org\n\nb".encode()


def test_group_names_and_comments_are_encoded_and_addresses_stay():
    """In an address field a group name or a comment that is not ASCII is encoded; a quoted address that is not
    ASCII stays as it is."""
    data = 'Cc: Fr\u00fcnde: a@x.org (J\u00f6rg), b@x.org;\nReply-To: "Caf\u00e9"@x.org\n\n'.encode()
    assert encode_headers(data) == ('Cc: =?utf-8?q?Fr=C3=BCnde?= : a@x.org (=?utf-8?b?SsO2cmc=?=), b@x.org;\n'
                                    'Reply-To: "Caf\u00e9"@x.org\n\n').encode()


def test_fields_whose_syntax_encoding_would_break_are_left_as_they_are():
    """Message-ID, References and Content-* fields are never rewritten, even when not ASCII."""
    fields = ("Message-ID: <caf\u00e9@x>\nReferences: <\u00e9@x>\n"
              "Content-Disposition: attachment; filename=\"caf\u00e9.txt\"\n").encode()
    assert encode_headers(fields + b"\nbody") == fields + b"\nbody"


def test_header_ends_at_a_line_that_is_not_a_field():
    """A line that is neither a field nor a continuation starts the body, as for an MTA: nothing after it changes."""
    data = "Subject: \u00e9\nno field here: caf\u00e9\nX: \u00e9\n\n".encode()
    assert encode_headers(data) == "Subject: =?utf-8?b?w6k=?=\nno field here: caf\u00e9\nX: \u00e9\n\n".encode()


def test_bytes_that_are_not_utf8_become_replacement_characters():
    """Header bytes that are not UTF-8 are encoded as U+FFFD; the body keeps its bytes."""
    out = encode_headers(b"Subject: caf\xe9 \xff\n\n\xe9")
    assert out == b"Subject: =?utf-8?b?Y2Fm77+9IO+/vQ==?=\n\n\xe9"
    assert shown(out, "Subject") == "caf\ufffd \ufffd"


def test_bare_cr_in_a_field_cannot_start_a_line():
    """A bare CR in a rewritten field goes inside an encoded-word or becomes a space, never a line break on the wire."""
    out = encode_headers("Subject: \u00e9\rBcc: evil@x.org\nTo: J\u00f6rg <a@x.org>\rBcc: evil@x.org\n\n".encode())
    fields, _ = split(out)
    assert names(fields) == [b"subject", b"to"] and b"\r" not in out
    assert shown(out, "Subject") == "\u00e9\rBcc: evil@x.org"


def test_long_subject_is_folded_within_78_characters_without_splitting_a_character():
    """A long subject becomes encoded-words of at most 75 characters on lines of at most 78, each decodable alone."""
    subject = "\u00dcnic\u00f6de \u20ac \U0001f600 " * 20
    out = encode_headers(f"Subject: {subject}\r\n\r\n".encode())
    fields, _ = split(out)
    assert all(len(line) <= 78 for line in lines_of(fields))
    assert all(len(w) <= 75 for w in ENCODED_WORD.findall(out.decode()))
    assert "".join(word_text(w) for w in ENCODED_WORD.findall(out.decode())) == subject.rstrip()
    assert shown(out, "Subject") == subject


# -- any text -----------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(text=hostile_text(300).map(lambda t: t.replace("\n", " ")))
def test_any_subject_decodes_back_to_its_text(text):
    """Any subject comes out ASCII and decodes (both of the email package's ways) to the text it was."""
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates: bytes that are not UTF-8
    data = b"Subject: " + raw + b"\r\nTo: a@x.org\r\n\r\n" + BODY
    out = encode_headers(data)
    fields, rest = split(out)
    assert rest == b"\r\n" + BODY and names(fields) == [b"subject", b"to"]
    if raw.isascii():
        return
    assert all(line.isascii() for line in lines_of(fields))
    for line in lines_of(fields):  # longer only when one word of the text is
        assert len(line) <= 78 or len(line.removeprefix("Subject:").split()) == 1, line
    original = raw.decode("utf-8", "replace").lstrip(" \t")
    assert shown(out, "Subject") == original
    assert decoded(fields[0].decode()[len("Subject:"):].replace("\r\n", "")).strip(" \t") == original.strip(" \t")


NAME = hostile_text(40).map(lambda t: t.replace("\n", " ").replace("\r", " ").strip(" \t"))
LOCAL = st.one_of(st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8})?", fullmatch=True),
                  st.from_regex(r"[a-z\u00e0-\u00ff]{1,8}", fullmatch=True))


def quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=300, deadline=None)
@given(members=st.lists(st.tuples(NAME, LOCAL), min_size=1, max_size=4))
def test_any_display_names_decode_back_and_addresses_stay(members):
    """Display names of any text decode back to themselves; every address is kept byte for byte."""
    value = ", ".join(f"{quoted(name)} <{local}@example.org>" for name, local in members)
    data = f"To: {value}\r\n\r\nbody".encode("utf-8", "surrogatepass")
    out = encode_headers(data)
    fields, rest = split(out)
    assert names(fields) == [b"to"] and rest == b"\r\nbody"
    addresses = [f"{local}@example.org" for _, local in members]
    text = fields[0].decode("utf-8")
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)  # what is left of an ASCII display name
    assert re.findall(r"<([^>]*)>", unquoted) == addresses
    assert re.sub(r"<[^>]*>", "", unquoted).isascii()
    texts = [n.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for n, _ in members]
    assert "".join(word_text(w) for w in ENCODED_WORD.findall(text)) == "".join(t for t in texts if not t.isascii())
    if out.isascii():  # the header registry also changes whitespace (it keeps a space between encoded-words)
        parsed = message_from_bytes(out, policy=default)["To"].addresses
        expected = [(re.sub(r"\s", "", t), a) for t, a in zip(texts, addresses, strict=True)]
        assert [(re.sub(r"\s", "", a.display_name), a.addr_spec) for a in parsed] == expected


@settings(max_examples=1000, deadline=None)
@given(header=st.lists(st.binary(max_size=120), min_size=1, max_size=6), body=st.binary(max_size=50))
def test_any_header_bytes_keep_their_fields_and_body(header, body):
    """Whatever bytes the header holds, nothing is raised, no field appears or goes, no line starts outside
    a field, and the body is untouched."""
    data = b"Subject: x\r\n" + b"\r\n".join(b"To: " + h.replace(b"\n", b" ") if i % 2 else
                                            b"X-" + h.replace(b"\n", b"\n ") for i, h in enumerate(header))
    data += b"\r\n\r\n" + body
    out = encode_headers(data)
    fields_in, rest_in = split(data)
    fields_out, rest_out = split(out)
    assert names(fields_out) == names(fields_in) and rest_out == rest_in
    for before, after in zip(fields_in, fields_out, strict=True):
        if after != before:
            assert b"\r" not in after.rstrip(b"\r\n").replace(b"\r\n", b"")
            assert all(len(w) <= 75 for w in ENCODED_WORD.findall(after.decode("utf-8", "replace")))
