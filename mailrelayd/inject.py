#!/usr/bin/env python3
"""A sendmail-compatible command that queues a message in mailrelayd's spool directory.

For programs inside a jail (Trac, cron, scripts): it reads a message on stdin and writes
it, with its envelope (sender and recipients), as one file in the spool that mailrelayd
watches. It never talks to the network and never delivers anything itself.

This file uses only the standard library and imports nothing from mailrelayd, so it can
be copied alone into a jail that has a Python but not mailrelayd's dependencies and run
as `python3 inject.py ...`. The relay imports `split_envelope` from it.

Limits: one message per run, at most MAX_MESSAGE_SIZE bytes; delivery modes other than
-bm are refused; the message is stored as read (never decoded, never re-encoded), except
that -t drops Bcc: fields and -F may add a From: line.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses

ENVELOPE_MAGIC = b"MAILRELAYD-ENVELOPE 1\n"
ENVELOPE_PREFIX = b"MAILRELAYD-ENVELOPE "  # any version
MAX_MESSAGE_SIZE = 25 * 1024 * 1024
DEFAULT_SPOOL = "/var/spool/mailrelayd"
SPOOL_ENV = "MAILRELAYD_SPOOL"
FILE_MODE = 0o640  # set with fchmod, whatever the umask: the relay may read as the group
TEMP_PREFIX = ".mailrelayd-tmp-"  # dot files are ignored by the relay

_PROG = "mailrelayd-sendmail"
# The options, declared once: (letter, argument or "", what it does). The parser and the
# manual page (mailrelayd.cli.docs) both come from this table.
OPTIONS = [
    ("t", "", "read recipients from the To:, Cc: and Bcc: fields too, and drop Bcc: from the message"),
    ("i", "", "a line holding a single dot does not end the message (always so: accepted for compatibility)"),
    ("f", "ADDR", "envelope sender: a plain address, or '' or <> for the null sender"),
    ("r", "ADDR", "the same as -f"),
    ("F", "NAME", "full name of the sender: adds a From: field when the message has none"),
    ("b", "MODE", "delivery mode: only -bm (the default) is accepted; any other mode is refused"),
    ("o", "OPTION", "a sendmail option: accepted and ignored"),
    ("e", "X", "error reporting mode: accepted and ignored"),
    ("v", "", "verbose: accepted and ignored"),
    ("U", "", "initial user submission: accepted and ignored"),
    ("G", "", "gateway submission: accepted and ignored"),
    ("N", "DSN", "delivery status notification: accepted and ignored"),
    ("B", "TYPE", "body type: accepted and ignored"),
    ("R", "RET", "what to return in a bounce: accepted and ignored"),
    ("V", "ENVID", "envelope id: accepted and ignored"),
    ("X", "LOGFILE", "traffic log: accepted and ignored"),
    ("L", "LABEL", "syslog label: accepted and ignored"),
    ("O", "OPTION=VALUE", "a long sendmail option: accepted and ignored"),
]
_FLAGS = {letter for letter, argument, _ in OPTIONS if not argument}
_WITH_ARGUMENT = {letter for letter, argument, _ in OPTIONS if argument}  # attached (-fADDR) or next (-f ADDR)
_RENAME_NOREPLACE = 1


class UsageError(Exception):
    """The command line or the message cannot be accepted (exit os.EX_USAGE)."""


@dataclass
class Request:
    """What the command line asks for: envelope sender, recipients, spool directory."""

    sender: str | None = None
    full_name: str | None = None
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False
    spool: str | None = None


def parse_args(argv: list[str]) -> Request:
    """Read sendmail-style options (clustered as getopt does), then recipients."""
    request, i = Request(), 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg, i = argv[i], i + 1
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name != "--spool":
                raise UsageError(f"unknown option {arg}")
            if not eq:
                if i == len(argv):
                    raise UsageError("option --spool needs a directory")
                value, i = argv[i], i + 1
            if not value:
                raise UsageError("option --spool needs a directory")
            request.spool = value
            continue
        for j, letter in enumerate(arg[1:], 1):
            if letter in _FLAGS:
                request.from_headers |= letter == "t"
                continue
            if letter not in _WITH_ARGUMENT:
                raise UsageError(f"unknown option -{letter}")
            value = arg[j + 1:]
            if not value:
                if i == len(argv):
                    raise UsageError(f"option -{letter} needs an argument")
                value, i = argv[i], i + 1
            if letter in "fr":
                request.sender = "" if value in ("", "<>") else _checked(value, "sender")
            elif letter == "F":
                if not value.isprintable():
                    raise UsageError("full name (-F) holds control characters")
                request.full_name = value
            elif letter == "b" and value != "m":
                raise UsageError(f"mode -b{value} is not supported, only -bm")
            break  # -o, -e, -N, -B, -R, -V, -X, -L, -O: accepted and ignored
    request.recipients = [_checked(r, "recipient") for r in argv[i:]]
    return request


# The one rule for a plain address, used by the injector, the relay and the config alike:
# a dot-atom local part of atext (and non-ASCII letters), and a domain of letters, digits
# and hyphens or a domain literal ([192.0.2.1], [IPv6:2001:db8::1]).
_ATOM = r"[\w!#$%&'*+/=?^`{|}~-]+"
_PLAIN = re.compile(rf"{_ATOM}(?:\.{_ATOM})*(?:@(?:[\w-]+(?:\.[\w-]+)*|\[(?:IPv6:)?[0-9A-Fa-f:.]+\]))?")


def is_plain_address(address: str, need_domain: bool = False) -> bool:
    """True if `address` is a plain local@domain (or, unless `need_domain`, a bare local
    name such as "root"), and nothing a command line, a mail system or SMTP could take
    for more: no leading "-" (an option), "|" (a command) or "/" (a file), no spaces,
    quotes, comments, brackets or control characters, at most 254 characters."""
    return (
        0 < len(address) <= 254
        and address[0] not in "-|/"
        and (not need_domain or "@" in address)
        and "_" not in address.rpartition("@")[2]
        and _PLAIN.fullmatch(address) is not None
    )


def _checked(address: str, what: str) -> str:
    if not is_plain_address(address):
        raise UsageError(f"{what} is not a plain address: {address!r}"[:200])
    return address


def format_envelope(sender: str, recipients: list[str] | tuple[str, ...]) -> bytes:
    """The preamble written before the message: magic line, sender, recipients, blank line."""
    lines = [f"sender {sender}\n"] + [f"recipient {r}\n" for r in recipients] + ["\n"]
    return ENVELOPE_MAGIC + "".join(lines).encode("utf-8")


def split_envelope(data: bytes) -> tuple[str, tuple[str, ...], bytes] | None:
    """(sender, recipients, message) from a spool file the injector wrote.

    None if `data` does not start with "MAILRELAYD-ENVELOPE " (a Fossil file, say);
    ValueError with the reason if it does but the preamble is not exactly what
    `format_envelope` writes. The sender is "" for the null sender.
    """
    if not data.startswith(ENVELOPE_PREFIX):
        return None
    if not data.startswith(ENVELOPE_MAGIC):
        raise ValueError("unknown envelope version: " + repr(data[:40].split(b"\n")[0]))
    sender: str | None = None
    recipients: list[str] = []
    pos = len(ENVELOPE_MAGIC)
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise ValueError("envelope has no blank line before the message")
        raw, pos = data[pos:end], end + 1
        if not raw:
            break
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"envelope line is not UTF-8: {raw[:80]!r}") from None
        key, space, value = line.partition(" ")
        if key == "sender" and sender is None and not recipients:
            if value and not is_plain_address(value):
                raise ValueError(f"bad sender address in envelope: {value[:80]!r}")
            sender = value
        elif key == "recipient" and sender is not None and space:
            if not is_plain_address(value):
                raise ValueError(f"bad recipient address in envelope: {value[:80]!r}")
            recipients.append(value)
        else:
            raise ValueError(f"unexpected envelope line: {line[:80]!r}")
    if sender is None:
        raise ValueError("envelope has no sender line")
    if not recipients:
        raise ValueError("envelope has no recipient")
    return sender, tuple(recipients), data[pos:]


def _header_fields(message: bytes) -> tuple[list[tuple[str | None, list[bytes]]], int]:
    """The header's fields as (lower-case name or None, raw lines with their line ends),
    and the offset where the header ends (the blank line, or the end of the data)."""
    fields: list[tuple[str | None, list[bytes]]] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\n", pos)
        end = len(message) if end < 0 else end + 1
        line = message[pos:end]
        if line in (b"\n", b"\r\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            name, colon, _ = line.partition(b":")
            name = name.rstrip(b" \t")
            ok = colon and name and not any(c <= 32 or c >= 127 for c in name)
            fields.append((name.decode("ascii").lower() if ok else None, [line]))
        pos = end
    return fields, pos


def prepare(request: Request, message: bytes) -> tuple[str, list[str], bytes]:
    """The envelope sender, the recipients and the message bytes to store."""
    fields, header_end = _header_fields(message)
    recipients = list(request.recipients)
    if request.from_headers:
        for name, lines in fields:
            if name in ("to", "cc", "bcc"):
                value = b"".join(lines).partition(b":")[2].decode("utf-8", "surrogateescape")
                value = value.replace("\r", " ").replace("\n", " ")
                recipients += [_checked(a, f"{name.title()}: address") for _, a in getaddresses([value]) if a]
        if any(name == "bcc" for name, _ in fields):
            kept = b"".join(line for name, lines in fields if name != "bcc" for line in lines)
            message = kept + message[header_end:]
    if not recipients:
        raise UsageError("no recipients given" + (" nor in To:, Cc: or Bcc:" if request.from_headers else ""))
    sender = request.sender or ""
    if request.full_name is not None and sender and not any(name == "from" for name, _ in fields):
        newline = b"\r\n" if fields and fields[0][1][0].endswith(b"\r\n") else b"\n"
        message = b"From: " + formataddr((request.full_name, sender)).encode("utf-8") + newline + message
    return sender, list(dict.fromkeys(recipients)), message


def _read_message() -> bytes:
    if sys.stdin is None:
        raise OSError(errno.EBADF, "standard input is closed")
    data = sys.stdin.buffer.read(MAX_MESSAGE_SIZE + 1)
    if len(data) > MAX_MESSAGE_SIZE:
        raise UsageError(f"message too large (over {MAX_MESSAGE_SIZE} bytes)")
    return data


def spool_file_name() -> str:
    """A Fossil-style name: UTC YYYYMMDDHHMMSS, 4-digit counter (pid), 6 random digits."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return f"{stamp}{os.getpid() % 10000:04d}{secrets.randbelow(1_000_000):06d}.email"


@functools.cache
def _libc_renameat2():
    """Linux renameat2() through ctypes, as f(src, dst, dir_fd) -> errno; None if absent."""
    try:
        import ctypes
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int

    def call(src: str, dst: str, dir_fd: int) -> int:
        if function(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return 0
        return ctypes.get_errno()

    return call


def rename_noreplace(src: str, dst: str, dir_fd: int) -> None:
    """Rename src to dst in dir_fd; FileExistsError if dst exists (never replaces it).

    Uses renameat2(RENAME_NOREPLACE); where the C library or the file system lacks it,
    falls back to link_noreplace.
    """
    renameat2 = _libc_renameat2()
    if renameat2 is not None:
        error = renameat2(src, dst, dir_fd)
        if error == 0:
            return
        if error not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(error, os.strerror(error), dst)
    link_noreplace(src, dst, dir_fd)


def link_noreplace(src: str, dst: str, dir_fd: int) -> None:
    """Move src to dst by link then unlink; FileExistsError if dst exists.

    Between the two calls the file has two links, which a relay that refuses hard links
    may notice; rename_noreplace avoids that where the kernel allows.
    """
    os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=dir_fd)


def publish(src: str, dir_fd: int, new_name=spool_file_name, move=rename_noreplace, attempts: int = 100) -> str:
    """Give src a fresh final name in dir_fd, retrying with a new name while one exists."""
    for _ in range(attempts):
        name = new_name()
        try:
            move(src, name, dir_fd)
        except FileExistsError:
            continue
        return name
    raise FileExistsError(errno.EEXIST, "no free file name in the spool")


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the descriptor `fd` (os.write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def enqueue(spool: str, sender: str, recipients: list[str], message: bytes) -> str:
    """Write one durable spool file atomically; return its name.

    OSError on any failure, after removing the temporary file; if only the final fsync of
    the directory fails, the file stays (a retry may then queue the message twice).
    """
    dir_fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        temp = TEMP_PREFIX + secrets.token_hex(8)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, FILE_MODE, dir_fd=dir_fd)
        published = False
        try:
            try:
                os.fchmod(fd, FILE_MODE)
                for chunk in (format_envelope(sender, recipients), message):
                    write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            name = publish(temp, dir_fd)
            published = True
        finally:
            if not published:
                try:
                    os.unlink(temp, dir_fd=dir_fd)
                except OSError:
                    pass
        os.fsync(dir_fd)
        return name
    finally:
        os.close(dir_fd)


def _fail(status: int, text: str) -> int:
    line = "".join(c if c.isprintable() else "?" for c in text)
    try:
        print(f"{_PROG}: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass
    return status


def main(argv: list[str] | None = None) -> int:
    """Run as sendmail would; return the exit status (sysexits.h). Prints only on failure."""
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except Exception as error:  # noqa: BLE001 -- a bug: still a single line, as Trac reads stderr
        return _fail(os.EX_SOFTWARE, f"internal error: {error!r}")


def _run(argv: list[str]) -> int:
    try:
        request = parse_args(argv)
        sender, recipients, message = prepare(request, _read_message())
    except UsageError as error:
        return _fail(os.EX_USAGE, str(error))
    except OSError as error:
        return _fail(os.EX_IOERR, f"cannot read the message: {error.strerror or error}")
    spool = request.spool or os.environ.get(SPOOL_ENV) or DEFAULT_SPOOL
    try:
        enqueue(spool, sender, recipients, message)
    except OSError as error:
        return _fail(os.EX_TEMPFAIL, f"cannot queue the message in {spool}: {error.strerror or error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
