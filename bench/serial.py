"""A serial queue consumer built to the description of Fossil's tools/email-sender.tcl.

    python bench/serial.py DB COMMAND     # e.g. COMMAND = "/usr/sbin/sendmail -ti"

The baseline of `bench.py --real` for what users run today (see
/work/shared/notes/fossil-queue-facts.md; the Tcl code itself is not in this project):
opens DB with WAL and a 5 s busy timeout, creates `email` and `sentlog` if missing, then
per message, in one BEGIN IMMEDIATE transaction: take the first row, pipe it to COMMAND
(split like a shell would) plus `-f ADDR` when the message has `From: ... <ADDR>`, DELETE
the row, INSERT a sentlog row (unix time, To address, From address, Subject, size),
COMMIT. Like the script, it holds the write lock while the command runs and stops at the
first command that fails (exit 1, one line on stderr). Unlike it, it exits 0 once the
queue is empty instead of sleeping 10 s and polling again, so that a run has an end.
"""

from __future__ import annotations

import re
import shlex
import sqlite3
import subprocess
import sys


def header(pattern: str, msg: str, default: str) -> str:
    found = re.search(pattern, msg)
    return found.group(1).strip() if found else default


def consume(db: str, command: list[str]) -> int:
    """Deliver every queued message, one transaction each; the number delivered."""
    conn = sqlite3.connect(db, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS email(emailid INTEGER PRIMARY KEY, msg TXT)")
    conn.execute("CREATE TABLE IF NOT EXISTS sentlog(mtime INT, xto TEXT, xfrom TEXT, xsubject TEXT, xsize INT)")
    sent = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT emailid, msg FROM email LIMIT 1").fetchone()
        if row is None:
            conn.execute("COMMIT")
            return sent
        emailid, msg = row
        to = header(r"To:[^\n]*<([^>]+)>", msg, "unk")
        subject = header(r"\nSubject:[ ]*([^\r\n]+)", msg, "none")
        sender = header(r"\nFrom:[^\n]*<([^>]+)>", msg, "")
        argv = command + (["-f", sender] if sender else [])
        try:
            status = subprocess.run(argv, input=msg.encode(), check=False).returncode
        except OSError as e:
            raise SystemExit(f"serial: cannot run {argv[0]}: {e.strerror or e}") from e
        if status != 0:
            conn.execute("ROLLBACK")
            raise SystemExit(f"serial: {argv[0]} exited {status} on email {emailid}; stopping, as the script does")
        conn.execute("DELETE FROM email WHERE emailid=?", (emailid,))
        conn.execute("INSERT INTO sentlog(mtime, xto, xfrom, xsubject, xsize) VALUES (unixepoch(), ?, ?, ?, ?)",
                      (to, sender, subject, len(msg)))
        conn.execute("COMMIT")
        sent += 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python bench/serial.py DB COMMAND")
    consume(sys.argv[1], shlex.split(sys.argv[2]))
