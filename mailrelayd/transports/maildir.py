"""Deliver into a local Maildir: write under tmp/, then rename into new/.

For trying mailrelayd out without an MTA and for reading exactly what would have been
sent (with `encode_utf8`, header text that is not ASCII as encoded-words, as the pipe
does). Messages are stored with local (LF) line endings, as Maildir readers expect, after
the lines a local delivery agent adds for the envelope: `Return-Path: <SENDER>` (none when
no sender would be passed on) and `X-Original-To:` and `Delivered-To:` for each recipient.
The envelope comes from a hostile queue: only plain addresses (`safe_address`) are
written, so nothing from it can add a header line of its own; others are left out.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from mailrelayd.message import Envelope, safe_address, to_lf
from mailrelayd.outcome import Outcome, Sent, TemporaryFailure
from mailrelayd.utf8_headers import encode_headers


class MaildirTransport:
    """Writes each message as one file in `root`/new, created with tmp/ and cur/."""

    def __init__(self, root: Path, encode_utf8: bool = True):
        self.root = root
        self.encode_utf8 = encode_utf8
        self._counter = itertools.count()
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def deliver(self, data: bytes, envelope: Envelope) -> Outcome:
        try:
            for sub in ("tmp", "new", "cur"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns() // 1000}.P{os.getpid()}Q{next(self._counter)}.{self._host}"
            tmp = self.root / "tmp" / name
            with open(tmp, "xb") as f:
                f.write(envelope_lines(envelope) + to_lf(encode_headers(data) if self.encode_utf8 else data))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.root / "new" / name)
            fsync_dir(self.root / "new")
        except OSError as e:
            return TemporaryFailure(f"cannot write to maildir {self.root}: {e.strerror or e}", setup_error=True)
        return Sent(f"new/{name}")

    def close(self) -> None:
        pass


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new or removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def envelope_lines(envelope: Envelope) -> bytes:
    """The Return-Path:, X-Original-To: and Delivered-To: lines for `envelope`'s plain addresses."""
    lines = []
    if envelope.sender and safe_address(envelope.sender):
        lines.append(f"Return-Path: <{envelope.sender}>")
    for recipient in filter(safe_address, envelope.recipients):
        lines += [f"X-Original-To: {recipient}", f"Delivered-To: {recipient}"]
    return "".join(line + "\n" for line in lines).encode()
