"""Queue alerts into emailqueue.db exactly as Fossil 2.21 does, and report how long each waited.

Run as `python fossil_like.py DB SECONDS`. It makes the same SQLite C calls as Fossil's
src/alerts.c (through ctypes, on the system's libsqlite3): `sqlite3_open` with no busy
handler, `CREATE TABLE IF NOT EXISTS email(...)` (which creates the file in rollback-journal
mode), one prepared `INSERT INTO email(msg) VALUES(?1)`, and for each message
`sqlite3_step` retried while it answers SQLITE_BUSY, at most 100 times with a 10 ms sleep,
then `sqlite3_reset`. Like one Fossil alert sender working through a long batch, it keeps
its connection for the whole run and inserts a message every 2 ms for SECONDS.

It prints one JSON object: `inserted` (the Subject of each message stored), `failures`
(Fossil's error for each message it would have lost) and `max_busy_retries` (the most
10 ms sleeps one message needed: 10 means Fossil waited 100 ms on another process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
import time

SQLITE_OK, SQLITE_BUSY = 0, 5
SQLITE_TRANSIENT = ctypes.c_void_p(-1)


def main(path: str, seconds: float) -> dict:
    lib = ctypes.CDLL(ctypes.util.find_library("sqlite3"))
    lib.sqlite3_errmsg.restype = ctypes.c_char_p
    db, stmt, err = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_char_p()
    inserted, failures, max_retries = [], [], 0
    if lib.sqlite3_open(path.encode(), ctypes.byref(db)) != SQLITE_OK:
        return {"inserted": [], "failures": ["unable to open output database file"], "max_busy_retries": 0}
    try:
        lib.sqlite3_exec(db, b"CREATE TABLE IF NOT EXISTS email(\n  emailid INTEGER PRIMARY KEY,\n  msg TEXT\n);",
                         None, None, ctypes.byref(err))
        if err.value:
            return {"inserted": [], "failures": [f"CREATE TABLE failed with {err.value.decode()}"],
                    "max_busy_retries": 0}
        lib.sqlite3_prepare_v2(db, b"INSERT INTO email(msg) VALUES(?1)", -1, ctypes.byref(stmt), None)
        end, n = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            n += 1
            subject = f"alert {n}"
            msg = (f"To: sub{n}@example.com\r\nSubject: {subject}\r\nFrom: noreply@example.org\r\n\r\n"
                   f"body {n}\r\n").encode()
            lib.sqlite3_bind_text(stmt, 1, msg, len(msg), SQLITE_TRANSIENT)
            retries = 0
            while retries < 100 and lib.sqlite3_step(stmt) == SQLITE_BUSY:
                lib.sqlite3_sleep(10)
                retries += 1
            max_retries = max(max_retries, retries)
            if lib.sqlite3_reset(stmt) == SQLITE_OK:
                inserted.append(subject)
            else:
                failures.append("Failed to insert email message into output queue. "
                                + lib.sqlite3_errmsg(db).decode())
            time.sleep(0.002)
    finally:
        lib.sqlite3_finalize(stmt)
        lib.sqlite3_close(db)
    return {"inserted": inserted, "failures": failures, "max_busy_retries": max_retries}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], float(sys.argv[2]))))
