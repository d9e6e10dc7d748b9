"""The cost of utf8_headers = "encode" per message (mailrelayd/utf8_headers.py).

Run by hand, from the repository root: `python bench/utf8_headers.py`. Prints the CPU time
of encode_headers for a Fossil alert whose header is ASCII (the fast path: one check, the
message returned as it is), for one with a subject and a display name in raw UTF-8 (what
Fossil writes for a non-ASCII forum title or user name), and for hostile headers of 64 KiB
(the most read_envelope lets through) that make every field, word or comment one to encode.
"""

from __future__ import annotations

import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelayd.utf8_headers import encode_headers

BODY = b"Content-Type: text/plain; charset=\"UTF-8\"\r\n\r\n" + b"A line of the alert's body.\r\n" * 80
CASES = {
    "Fossil alert, ASCII header": b"To: <bob@example.com>\r\nSubject: [repo] New forum post\r\n"
                                  b"From: <noreply@example.org>\r\n" + BODY,
    "Fossil alert, UTF-8 subject and name": "To: <bob@example.com>\r\nSubject: [repo] Caf\u00e9 \u00fcber alles\r\n"
                                            "From: J\u00f6rg M\u00fcller <noreply@example.org>\r\n".encode() + BODY,
    "64 KiB: one subject, 32,000 words": b"Subject: \xc3\xa9" + b" a" * 32000 + b"\r\n\r\n",
    "64 KiB: 6,000 fields to encode": b"X-A: \xc3\xa9\r\n" * 6000 + b"\r\n",
    "64 KiB: 15,000 comments in To:": b"To: " + b"(\xc3\xa9)" * 15000 + b"\r\n\r\n",
}


def main() -> None:
    for name, data in CASES.items():
        number = 20000 if len(data) < 10000 else 5
        best = min(timeit.repeat(lambda data=data: encode_headers(data), timer=time.process_time,
                                 number=number, repeat=3)) / number
        shown = f"{best * 1e6:.1f} us" if best < 1e-3 else f"{best * 1e3:.0f} ms"
        print(f"{name:40} {len(data):6} bytes  {shown} per message")


if __name__ == "__main__":
    main()
