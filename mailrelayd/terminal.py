"""Text for an administrator's terminal, which must never take orders from a queue.

Anything read from a queue (header text, file names, stored errors) may hold escape
sequences: ESC starts one (OSC 52 writes the clipboard), CR rewrites the line, and bidi
overrides or line separators make a line read as another. `clean` shows each such
character as a visible escape (`\\x1b`, `\\u2028`) instead; the admin commands, the
key=value logs and failure notices use it. Bytes that were not UTF-8 (lone surrogates,
from surrogateescape) are shown as `\\xff`; `escape_undecodable` does only that, for
output that escapes the rest itself (JSON).
"""

from __future__ import annotations

import re
import time

# C0 and DEL, C1, line and paragraph separators, bidi embeddings, overrides and isolates,
# lone surrogates (bytes that were not UTF-8), and the BOM / zero-width no-break space.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
_UNDECODABLE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    c = match.group()
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str, keep: str = "") -> str:
    """`text` with every control, separator and bidi character shown as an escape; the
    characters in `keep` (say "\\n\\t" for a header block) are left as they are."""
    if text.isprintable():  # none of them is printable: the common case costs one scan
        return text
    if keep:
        return "".join(c if c in keep else _UNSAFE.sub(_escape, c) for c in text)
    return _UNSAFE.sub(_escape, text)


def escape_undecodable(text: str) -> str:
    """`text` with its lone surrogates (bytes that were not UTF-8) shown as escapes, and
    nothing else changed."""
    return _UNDECODABLE.sub(_escape, text)


def one_line(text: str | None, limit: int = 200) -> str:
    """`text` on one line (whitespace runs made one space), cut to `limit`; "-" for none."""
    if not text:
        return "-"
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def age(seconds: float | None) -> str:
    """A duration as the largest whole unit: 45s, 21m, 3h, 5d."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def when(t: float | None) -> str:
    """Unix time as local date and time, or "-"."""
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))
