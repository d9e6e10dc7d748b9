"""Header text that is not ASCII, handed on as RFC 2047 encoded-words (utf8_headers = "encode").

Fossil writes subjects and display names as raw UTF-8; Postfix marks such mail SMTPUTF8
and bounces it at a relay that does not offer SMTPUTF8. `encode_headers` rewrites only the
header fields that hold a byte that is not ASCII:

- address fields (From, To, Cc, Reply-To, ...): display names, group names and comments
  become encoded-words; every address stays byte for byte, even one that is not ASCII
  (it cannot be encoded: only SMTPUTF8 carries it);
- fields whose syntax encoded-words would break (Message-ID, Date, References, Received,
  Content-*, DKIM-Signature, ...) are left as they are;
- in any other field (Subject, X-..., text) each run of words holding non-ASCII (or a
  control character, or "=?") becomes encoded-words; the words around it stay as they are.

Encoded-words are UTF-8, Q or B (whichever is shorter), at most 75 characters, never split
a character, and the rewritten field is folded within 78 characters (an ASCII word longer
than that stays whole on its line). Bytes that are not UTF-8 become U+FFFD; a bare CR
outside encoded-words becomes a space: nothing can start a line of its own. The header ends
where an MTA sees it end (the first line that is neither a field nor a continuation); the
body is never touched. A message whose header is ASCII is returned as it is after one
check. Nothing here raises.
"""

from __future__ import annotations

import base64
import re

from mailrelayd.message import header_block

_LINE = 78  # RFC 5322: lines SHOULD be at most 78 characters
_WORD = 75  # RFC 2047: an encoded-word is at most 75 characters
_OVERHEAD = len("=?utf-8?q??=")
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
_ADDRESS_FIELDS = frozenset({
    "from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-sender", "resent-reply-to",
    "resent-to", "resent-cc", "resent-bcc", "return-path", "delivered-to", "x-original-to", "errors-to",
    "mail-followup-to", "mail-reply-to", "disposition-notification-to", "apparently-to"})
_KEPT_FIELDS = frozenset({
    "date", "resent-date", "message-id", "resent-message-id", "in-reply-to", "references", "received",
    "mime-version", "dkim-signature", "arc-seal", "arc-message-signature", "arc-authentication-results",
    "authentication-results"})
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_PLAIN_WORD = re.compile(r"[!-~]+")  # printable ASCII
_SPACE = re.compile(r"[ \t]+")


def encode_headers(data: bytes) -> bytes:
    """`data` with the header text that is not ASCII as encoded-words (see the module's text)."""
    if header_block(data).isascii():
        return data
    starts: list[int] = []  # where each field starts
    pos = 0
    while pos < len(data):
        if not (data[pos:pos + 1] in (b" ", b"\t") and starts):  # a continuation line goes with its field
            if not _FIELD.match(data, pos):
                break  # the blank line, or a line no MTA takes for a field: the body starts here
            starts.append(pos)
        end = data.find(b"\n", pos)
        pos = len(data) if end < 0 else end + 1
    ends = [*starts[1:], pos]
    return b"".join(_rewritten(data[start:end]) for start, end in zip(starts, ends, strict=True)) + data[pos:]


def _rewritten(field: bytes) -> bytes:
    if field.isascii():
        return field
    start = _FIELD.match(field)
    assert start is not None
    name = start[0][:-1].rstrip(b" \t").decode("ascii").lower()
    if name in _KEPT_FIELDS or name.startswith("content-"):
        return field
    body = field[start.end():]
    ending = b"\r\n" if body.endswith(b"\r\n") else b"\n" if body.endswith(b"\n") else b""
    value = re.sub(rb"\r?\n", b"", body[: len(body) - len(ending)]).decode("utf-8", "surrogateescape")
    text = value.lstrip(" \t")
    folder = _Folder(start[0].decode("ascii"), value[: len(value) - len(text)] or " ")
    if name in _ADDRESS_FIELDS:
        _address_field(folder, text.replace("\r", " "))
    else:
        _text_field(folder, text)
    eol = "\n" if b"\n" in field and b"\r\n" not in field else "\r\n"
    return folder.result(eol).encode("utf-8", "surrogateescape") + ending


def _text_field(folder: _Folder, text: str) -> None:
    """Unstructured text: runs of words that are not plain printable ASCII (or hold "=?")
    are encoded, with the whitespace inside a run; the whitespace around a run stays."""
    parts = re.split(r"([ \t]+)", text)
    words, spaces = parts[0::2], [*parts[1::2], ""]
    run: list[str] = []
    for i, (word, space) in enumerate(zip(words, spaces, strict=True)):
        if _needs_encoding(word):
            run.append(word)
            if i + 1 < len(words) and _needs_encoding(words[i + 1]):
                run.append(space)
                continue
            folder.encoded("".join(run))
            run = []
        elif word:
            folder.text(word)
        folder.space(space)


def _needs_encoding(word: str) -> bool:
    return bool(word) and (not _PLAIN_WORD.fullmatch(word) or "=?" in word)


def _address_field(folder: _Folder, text: str) -> None:
    """An address list: in each member that has an angle-addr or names a group, the words
    outside the angle brackets are a phrase, encoded when not ASCII; in any other member they
    are the address itself and stay. Comments are encoded when not ASCII."""
    tokens = _address_tokens(text)
    member: list[tuple[str, str]] = []
    for kind, token in [*tokens, ("sep", "")]:
        if kind != "sep":
            member.append((kind, token))
            continue
        phrase = token == ":" or any(k == "angle" for k, _ in member)
        _member(folder, member, phrase)
        if token:
            folder.text(token)
        member = []


def _member(folder: _Folder, tokens: list[tuple[str, str]], phrase: bool) -> None:
    run: list[tuple[str, str]] = []  # words, and the spaces between them
    for i, (kind, token) in enumerate([*tokens, ("end", "")]):
        if kind in ("word", "quoted") or (kind == "space" and run and i + 1 < len(tokens)
                                          and tokens[i + 1][0] in ("word", "quoted")):
            run.append((kind, token))
            continue
        if run:
            if phrase and not all(t.isascii() for _, t in run):
                folder.encoded("".join(_unquoted(t) if k == "quoted" else t for k, t in run), spaced=True)
            else:
                for k, t in run:
                    folder.space(t) if k == "space" else folder.text(t)
            run = []
        if kind == "space":
            folder.space(token)
        elif kind == "comment" and not token.isascii():
            folder.encoded(_unquoted(token), prefix="(", suffix=")", spaced=True)
        elif kind != "end":
            folder.text(token)


def _address_tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text): space, quoted (a quoted-string), comment (nested), angle (<...>),
    sep (, ; :) or word (anything else: atoms, dots, @, domain literals). An unclosed
    quote, comment or angle bracket runs to the end."""
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c in " \t":
            space = _SPACE.match(text, i)
            j, kind = space.end() if space else i + 1, "space"
        elif c == '"':
            j, kind = _past_quoted(text, i), "quoted"
        elif c == "(":
            j, kind = _past_comment(text, i), "comment"
        elif c == "<":
            j, kind = _past_angle(text, i), "angle"
        elif c in ",;:":
            j, kind = i + 1, "sep"
        else:
            j, kind = i + 1, "word"
            while j < len(text) and text[j] not in ' \t"(<,;:':
                j = _past_quoted(text, j) if text[j] == "[" else j + 1
        tokens.append((kind, text[i:j]))
        i = j
    return tokens


def _past_quoted(text: str, i: int) -> int:
    """The index past the quoted-string (or domain literal) that opens at `i`."""
    close = '"' if text[i] == '"' else "]"
    j = i + 1
    while j < len(text) and text[j] != close:
        j += 2 if text[j] == "\\" else 1
    return min(j + 1, len(text))


def _past_comment(text: str, i: int) -> int:
    depth, j = 0, i
    while j < len(text):
        if text[j] == "\\":
            j += 1
        elif text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(text)


def _past_angle(text: str, i: int) -> int:
    j = i + 1
    while j < len(text) and text[j] != ">":
        j = _past_quoted(text, j) if text[j] == '"' else j + 1
    return min(j + 1, len(text))


def _unquoted(token: str) -> str:
    """The text of a quoted-string or comment: without its delimiters and backslashes."""
    inner = token[1:-1] if len(token) > 1 and token[-1] == {'"': '"', "(": ")"}[token[0]] else token[1:]
    return re.sub(r"\\(.)", r"\1", inner, flags=re.DOTALL)


class _Folder:
    """Builds a field's lines from pieces that never break (words, encoded-words) and the
    whitespace between them, where a line may be folded."""

    def __init__(self, start: str, space: str):
        self.lines: list[str] = []
        self.line = start  # the line being built
        self.pieces = 0  # pieces on it
        self.fresh = False  # just folded: folding again gains nothing
        self.pending = space  # the message's whitespace before the next piece
        self.gap = False  # a space must come before the next piece (when there is no whitespace)

    def space(self, space: str) -> None:
        self.pending += space

    def text(self, piece: str) -> None:
        if self.pieces and len(self.line) + len(self._separator()) + len(piece) > _LINE:
            self._fold()
        self._put(piece)

    def encoded(self, text: str, prefix: str = "", suffix: str = "", spaced: bool = False) -> None:
        """`text` as encoded-words, folded as needed; `spaced`: with whitespace before, and
        after unless a `suffix` (a comment's parenthesis) closes them."""
        self.gap = self.gap or spaced
        chars = [c.encode() for c in text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")]
        data = b"".join(chars)
        q = _cost(data, True) <= _cost(data, False)
        first = 0
        while first < len(chars):
            room = min(_WORD, _LINE - len(self.line) - len(self._separator()) - len(prefix) - len(suffix))
            room -= _OVERHEAD
            if room < _cost(chars[first], q) and not self.fresh:
                self._fold()
                continue
            word = chars[first]
            first += 1
            while first < len(chars) and _cost(word + chars[first], q) <= room:
                word += chars[first]
                first += 1
            if q:
                payload = "".join(chr(b) if b in _Q_SAFE else "_" if b == 32 else f"={b:02X}" for b in word)
            else:
                payload = base64.b64encode(word).decode()
            last = first == len(chars)
            self._put(f"{prefix}=?utf-8?{'q' if q else 'b'}?{payload}?={suffix if last else ''}")
            prefix = ""
            self.gap = True  # between two encoded-words
        self.gap = spaced and not suffix

    def result(self, eol: str) -> str:
        return eol.join([*self.lines, self.line + self.pending])

    def _separator(self) -> str:
        return self.pending or (" " if self.gap else "")

    def _put(self, piece: str) -> None:
        self.line += self._separator() + piece
        self.pending, self.gap, self.pieces, self.fresh = "", False, self.pieces + 1, False

    def _fold(self) -> None:
        self.lines.append(self.line)
        self.line, self.pending, self.gap, self.pieces, self.fresh = self._separator() or " ", "", False, 0, True


def _cost(data: bytes, q: bool) -> int:
    """Characters an encoded-word's payload takes for `data`, in Q or in B."""
    if q:
        return sum(1 if b in _Q_SAFE or b == 32 else 3 for b in data)
    return 4 * -(-len(data) // 3)
