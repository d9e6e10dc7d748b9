"""The spool mode of bench/bench.py (`python bench/bench.py --spool`).

The same measurements as the SQLite mode, against Fossil's spool directory
(email-send-method=dir) instead of emailqueue.db:

1. Throughput: a fresh spool directory holding N files written as Fossil writes them (one
   file per message, named YYYYMMDDHHMMSS + 4-digit counter + 6 random digits + `.email`,
   written in place with open/write/close, no temporary name), their mtimes set an hour
   back so that they count as settled, is drained by
   `python -m mailrelayd --drain --spool DIR --settle S` (S from `--settle`, default 2).
   After each drain the spool must be empty, STATE/deferred, failed and corrupt must be
   empty, and the relay must have logged N message_sent events.
2. Latency: the daemon runs on an empty spool (`--settle S`); each message is written
   with open/write/close every 20 ms, its time taken after close; the inotify
   close-after-write event should wake the relay at once. p50/p99/max of close -> sink start.
3. In place of the SQLite mode's longest write lock (there is no lock to wait for): the
   entries left in the spool and in STATE/deferred, failed and corrupt after the run.
4. Memory: as in the SQLite mode, but the big backlog defaults to 20,000 files, since
   creating 100,000 files in one directory is slow (`--big 100000` to run it anyway).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from pathlib import Path

STATE_KINDS = ("deferred", "failed", "corrupt")
SETTLED_AGO = 3600.0  # seconds: the mtime given to backlog files, well past any settle time


def fossil_name(when: float, counter: int) -> str:
    """A file name as Fossil makes it: YYYYMMDDHHMMSS, a 4-digit counter, 6 random digits."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(when))
    return f"{stamp}{counter % 10_000:04d}{random.randrange(10**6):06d}.email"


def write_like_fossil(path: Path, msg: bytes) -> None:
    """fopen/fwrite/fclose at the final name: no temporary name, no rename, no lock."""
    with open(path, "wb") as f:
        f.write(msg)


class Leftovers:
    """The messages left in the spool and in STATE/deferred, failed and corrupt (not counting
    their .state and .reason files); counted when `result` is read, once the relay has exited."""

    def __init__(self, spool: Path, state: Path):
        self.spool, self.state = spool, state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def result(self) -> dict:
        count = lambda d: sum(not e.name.endswith((".state", ".reason")) for e in os.scandir(d)) if d.is_dir() else 0
        return {"spool": count(self.spool), **{k: count(self.state / k) for k in STATE_KINDS}}


class SpoolMode:
    """Fossil's spool directory (email-send-method=dir); the state directory beside it."""

    default_big = 20_000
    title = "files left"
    targets = "spool and STATE/deferred, failed, corrupt empty after each run"
    lat_enqueue = "close after write"
    head = f"{'spool':>7}{'deferred':>9}{'failed':>7}{'corrupt':>8}"
    blank = f"{'-':>7}{'-':>9}{'-':>7}{'-':>8}"

    def __init__(self, tmp: Path, args: argparse.Namespace):
        self.tmp, self.settle = tmp, args.settle
        self.counter = 0
        self.notes = [
            "spool, deferred, failed, corrupt: messages left in SPOOL and STATE/<kind> after the run; all must be 0,",
            "  and each drain must log one message_sent per file. There is no write lock in a spool to wait for.",
            f"files: written in place (open/write/close), Fossil's names, mtimes {SETTLED_AGO:g} s old "
            f"(settled for --settle {self.settle:g}s).",
        ]
        if args.big == self.default_big:
            self.notes.append(f"backlog-{self.default_big:,}: the spool mode's default --big "
                              "(100,000 files in one directory are slow to create; --big 100000 runs it).")

    def describe(self) -> str:
        return f"spool directory (--settle {self.settle:g}s)"

    def dirs(self, name: str) -> tuple[Path, Path]:
        spool = self.tmp / name
        return spool, spool.with_name(spool.name + ".mailrelayd")  # mailrelayd's default state dir

    def fresh(self, name: str, msgs: list[bytes]) -> list[str]:
        """An empty spool filled with `msgs`, settled; the relay's queue arguments."""
        spool, state = self.dirs(name)
        for d in (spool, state):
            shutil.rmtree(d, ignore_errors=True)
        spool.mkdir()
        base = time.time() - SETTLED_AGO
        for i, msg in enumerate(msgs):
            when = base + i // 10_000  # the counter wraps at 10,000 within one second
            path = spool / fossil_name(when, i)
            write_like_fossil(path, msg)
            os.utime(path, (when, when))
        return ["--spool", str(spool), "--settle", f"{self.settle:g}s"]

    def watch(self, name: str) -> Leftovers:
        return Leftovers(*self.dirs(name))

    def enqueue(self, name: str, msg: bytes) -> int:
        """Write one file as Fossil does; returns the time just after its close."""
        path = self.dirs(name)[0] / fossil_name(time.time(), self.counter)
        self.counter += 1
        write_like_fossil(path, msg)
        return time.time_ns()

    def check(self, name: str, r: dict) -> str:
        left, sent = r["watch"], r["sent"]
        ok = r["rc"] == 0 and not any(left.values()) and sent == r["n"]
        return "ok" if ok else (f"FAIL (exit {r['rc']}, " + ", ".join(f"{k} {v}" for k, v in left.items())
                                + f", message_sent {sent})")

    def cells(self, left: dict) -> str:
        return f"{left['spool']:>7}{left['deferred']:>9}{left['failed']:>7}{left['corrupt']:>8}"

    def fails(self, what: str, left: dict) -> list[str]:
        if what == "latency run" and any(left.values()):  # drains report this in their check
            return ["latency run: left after SIGTERM: " + ", ".join(f"{k} {v}" for k, v in left.items())]
        return []
