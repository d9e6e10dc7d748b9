"""Find Fossil's own tools/email-sender.tcl on this machine and point a copy at a bench queue.

The script is not part of this project (nor of Debian's `fossil` binary package); it is in
Fossil's source: Debian's source package (`apt-get source fossil`, with a deb-src line in
the APT sources, unpacks it as fossil-2.21/tools/email-sender.tcl) or
https://fossil-scm.org/home/file/tools/email-sender.tcl. It runs with `tclsh` and the Tcl
SQLite binding (`apt-get install tcl libsqlite3-tcl`).

Looked for, in order: `--tcl-script PATH` (repeatable), the environment variable
EMAIL_SENDER_TCL (paths separated by colons), else every fossil*/tools/email-sender.tcl
under /usr/local/src, /usr/src, the home directory and the current directory; each of the
two designs (see Script) runs once. The script keeps its settings in two lines,
`set DBFILE ...` and `set PIPE ...`: the bench runs a copy with them replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "EMAIL_SENDER_TCL"
SEARCH = ("/usr/local/src", "/usr/src", "~", ".")
HOW = ("get it with `apt-get source fossil` (needs a deb-src line) or from "
       "https://fossil-scm.org/home/file/tools/email-sender.tcl, then pass --tcl-script PATH")
TCL_SAFE = re.compile(r"[A-Za-z0-9_./@:+=,-]+")


@dataclass(frozen=True)
class Script:
    """One email-sender.tcl. Two designs are about: Fossil 2.21's (Debian 12's source) runs one
    transaction over the whole queue, piping every message, then deletes them all and keeps
    no log; later ones take one message per transaction and log it in `sentlog`."""

    path: Path
    per_message: bool
    key: str

    @property
    def label(self) -> str:
        return "email-sender.tcl, " + ("per message" if self.per_message else "batch")


def find_scripts(given: list[str] | None) -> tuple[list[Script], list[str]]:
    """The scripts to run (each design once), and notes on what was found or skipped."""
    if given or os.environ.get(ENV_VAR):
        origin = "--tcl-script" if given else ENV_VAR
        paths = [Path(p).expanduser() for p in (given or os.environ[ENV_VAR].split(os.pathsep))]
    else:
        origin = "found"
        paths = sorted({p.resolve() for root in SEARCH for p in Path(root).expanduser().glob(
            "fossil*/tools/email-sender.tcl")})
        if not paths:
            return [], ["email-sender.tcl: not found; " + HOW]
    scripts, notes = [], []
    for path in paths:
        if not path.is_file():
            notes.append(f"email-sender.tcl: {origin} {path}: no such file")
            continue
        per_message = "sentlog" in path.read_text(errors="replace")
        script = Script(path, per_message, f"tcl-{'msg' if per_message else 'batch'}")
        if any(s.key == script.key for s in scripts):
            notes.append(f"{script.label}: {path} skipped, the same design as another one")
        else:
            scripts.append(script)
            notes.append(f"{script.label}: {origin} {path}")
    return scripts, notes


def check_tclsh() -> str | None:
    """Why the script cannot run here (no tclsh, no Tcl SQLite binding), or None."""
    tclsh = shutil.which("tclsh")
    if not tclsh:
        return "tclsh is not installed (apt-get install tcl)"
    probe = subprocess.run([tclsh], input="puts [package require sqlite3]\n", capture_output=True, text=True,
                           timeout=30, check=False)
    if probe.returncode != 0 or not probe.stdout.strip():
        return "the Tcl SQLite binding is missing (apt-get install libsqlite3-tcl)"
    return None


def point_at(script: Path, copy: Path, db: Path, command: str) -> str | None:
    """Write `copy`: the script with DBFILE and PIPE set to db and command; None, or why not."""
    if not all(TCL_SAFE.fullmatch(word) for word in (str(db), *command.split())):
        return f"cannot quote {db} or {command!r} for Tcl"
    text, n_db = re.subn(r"(?m)^set DBFILE .*$", f"set DBFILE {db}", script.read_text())
    text, n_pipe = re.subn(r"(?m)^set PIPE .*$", f'set PIPE "{command}"', text)
    if (n_db, n_pipe) != (1, 1):
        return f"{script} has no single `set DBFILE` and `set PIPE` line: not email-sender.tcl?"
    copy.write_text(text)
    return None
