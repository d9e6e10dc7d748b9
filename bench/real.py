"""The `--real` mode of bench/bench.py: mailrelayd beside what users run today, on real mail systems.

    python bench/bench.py --real                      # every system below, then the failure run
    python bench/bench.py --real postfix msmtp        # only these (sink slow postfix msmtp smtp tempfail latency)
    python bench/bench.py --real slow --messages 100 --fixed 1,8,32 --tcl-script PATH
    python bench/bench.py --real sink --repeat 3      # best of 3 rounds: steadier on a busy machine

For each mail system of bench/systems.py, started privately on loopback, the same N
Fossil-style messages (bench.message) are queued afresh in an emailqueue.db (WAL, as any
consumer leaves it) for each consumer in turn, all in one run:

- serial: bench/serial.py, a consumer built to the description of Fossil's email-sender.tcl
  (one BEGIN IMMEDIATE transaction per message, piped with -f, deleted, logged);
- email-sender.tcl itself (bench/tcl.py says where it is looked for, and which two designs
  are about), with `tclsh`; it never exits, so its run ends when the queue is empty (and,
  for the design that keeps one, sentlog holds N rows);
- spawner (C sink only): bench/spawn.c handing the same messages to the sink serially
  (posix_spawn, pipe, wait): the cheapest serial hand-off, with no queue at all;
- mailrelayd `--drain` with its defaults (no --workers), then with each `--fixed` number.

Each figure is N divided by the wall time from starting the consumer's process to its end
(start-up included, for every consumer alike); with `--repeat K`, the best of K rounds (the
consumers take turns in each round, so that a change in the machine's load hits all
alike). A run counts only if its process ended well, the email table is empty, sentlog
holds N rows (if kept) and the mail system received N messages (Postfix's and the SMTP
servers' own counters); otherwise its figure is marked `*` and the reason listed (a failed
round is shown rather than a good one). Every run is cut off after RUN_LIMIT seconds.
The failure run is bench/tempfail.py; the idle-queue latency and write-lock runs, and
the targets (issue 13), each printed against its figure as PASS or MISS, bench/targets.py.
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import systems
import targets
import tcl
import tempfail

from bench import ENV, ROOT, build_c, fresh_db, message, relay_cmd, steady_rate, verdict

FIXED = (1, 2, 4, 8, 16, 32)
RUN_LIMIT = 120.0
SERIAL = Path(__file__).with_name("serial.py")


@dataclass
class Run:
    """One consumer's run: its rate (None if it did not run), and "ok" or what went wrong."""

    rate: float | None
    check: str
    seconds: float = math.nan
    steady: float = math.nan

    @property
    def good(self) -> bool:
        return self.rate is not None and self.check == "ok"


def fresh_queue(path: Path, msgs: list[bytes]) -> None:
    """bench.fresh_db, then WAL mode, as any consumer (Tcl, serial, mailrelayd) leaves the file."""
    fresh_db(path, msgs)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def queue_counts(db: Path) -> tuple[int, int | None]:
    """The rows in email and in sentlog (None: no such table); (-1, None) if unreadable."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0) as conn:
            email = conn.execute("SELECT count(*) FROM email").fetchone()[0]
            logged = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'sentlog'").fetchone()
            sent = conn.execute("SELECT count(*) FROM sentlog").fetchone()[0] if logged else None
        conn.close()
        return email, sent
    except sqlite3.Error:
        return -1, None


def run(system: systems.System, argv: list[str], db: Path | None, n: int, log: Path, exits: bool = True,
        sentlog: bool = True) -> Run:
    """Run one consumer to its end (or, if it never `exits`, until db is done); check the outcome.

    Done means: the email table empty and, if the consumer keeps a `sentlog`, n rows in it."""
    before = system.received() if system.received else 0
    done = (lambda: queue_counts(db) == (0, n)) if sentlog else (lambda: queue_counts(db)[0] == 0)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env={**ENV, **system.env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None and time.perf_counter() - t0 < RUN_LIMIT:
            if not exits and done():
                break
            try:
                proc.wait(RUN_LIMIT - (time.perf_counter() - t0) if exits else 0.01)
            except subprocess.TimeoutExpired:
                pass
        seconds = time.perf_counter() - t0
        running = proc.poll() is None
        if running:
            proc.kill()
            proc.wait()
    problems = []
    if running and (exits or not done()):
        problems.append(f"cut off after {RUN_LIMIT:g} s")
    elif not running and proc.returncode != 0:
        problems.append(f"exit {proc.returncode}")
    if db is not None:
        if not done():
            email, sent = queue_counts(db)
            problems.append(f"email {email}, sentlog {sent}")
    if system.received:
        deadline = time.monotonic() + system.settle
        while (got := system.received() - before) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        if got != n:
            problems.append(f"the mail system received {got}")
    if problems:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        problems += [f"last output: {tail[0][:200]}"] if tail else []
    return Run(n / seconds, "; ".join(problems) or "ok", seconds)


def keep(old: Run | None, new: Run) -> Run:
    """Of two runs of one consumer: a failed one (never hidden), else the faster."""
    if old is None or (old.good and (not new.good or new.rate > old.rate)):
        return new
    return old


def measure(system: systems.System, n: int, args, tmp: Path, tools: dict) -> dict[str, Run]:
    """Every consumer's run on one system, `args.repeat` rounds of them; the best of each."""
    msgs = [message(i, system.name) for i in range(n)]
    runs: dict[str, Run] = {}

    def queue(key: str) -> Path:
        db = tmp / f"{system.name}-{key}.db"
        fresh_queue(db, msgs)
        return db

    def record(key: str, r: Run) -> None:
        runs[key] = keep(runs.get(key), r)
        rate = f"{r.rate:,.1f} msg/s in {r.seconds:.2f} s" if r.rate is not None else "skipped"
        steady = f" (steady {r.steady:,.1f})" if not math.isnan(r.steady) else ""
        print(f"  {system.name} {key}: {rate}{steady}{'' if r.check == 'ok' else ': ' + r.check}", flush=True)

    for _ in range(args.repeat):
        if system.command:
            db = queue("serial")
            record("serial", run(system, [sys.executable, str(SERIAL), str(db), system.command], db, n,
                                 tmp / f"{system.name}-serial.log"))
            for script in tools["tcl"]:
                db, copy = queue(script.key), tmp / f"{system.name}-{script.key}.tcl"
                problem = tcl.point_at(script.path, copy, db, system.command)
                record(script.key, Run(None, f"skipped: {problem}") if problem else
                       run(system, ["tclsh", str(copy)], db, n, tmp / f"{system.name}-{script.key}.log",
                           exits=False, sentlog=script.per_message))
        if system.name == "sink" and tools["spawn"]:
            batch = tmp / "spawn-messages"
            batch.write_bytes(b"\0".join(msgs))
            record("spawner", run(system, [tools["spawn"], str(batch), *system.command.split()], None, n,
                                  tmp / "sink-spawner.log"))
        for workers in [None, *args.fixed]:
            key = "default" if workers is None else f"w{workers}"
            db, log = queue(key), tmp / f"{system.name}-{key}.log"
            r = run(system, relay_cmd(["--db", str(db)], system.relay, workers, True), db, n, log)
            r.steady = steady_rate(log)
            record(key, r)
    return runs


def ratio(a: Run | None, b: Run | None) -> float | None:
    return a.rate / b.rate if a and b and a.good and b.good else None


def cell(r: Run | None) -> str:
    """A rate for the table: '-' not applicable, 'skip' not run, '*' its check failed."""
    if r is None:
        return "-"
    return "skip" if r.rate is None else f"{r.rate:,.1f}" + ("" if r.good else "*")


def table(columns: list[tuple[systems.System, int, dict[str, Run]]], fixed: list[int],
          scripts: list[tcl.Script]) -> list[str]:
    """The side-by-side table, a column per system."""
    def row(label: str, values: list[str]) -> str:
        return f"{label:<30}" + "".join(f"{v:>13}" for v in values)

    spawner = [("serial C spawner", "spawner")] if any("spawner" in r for _, _, r in columns) else []
    bests = [max((k for k in (f"w{w}" for w in fixed) if r[k].good), key=lambda k: r[k].rate, default=None)
             for _, _, r in columns]
    lines = [row("msg/s (start-up included)", [s.label for s, _, _ in columns]),
             row("messages", [f"{n:,}" for _, n, _ in columns])]
    for label, key in [("serial consumer (Python)", "serial"), *((t.label, t.key) for t in scripts), *spawner,
                       ("mailrelayd, defaults", "default"), *((f"mailrelayd --workers {w}", f"w{w}") for w in fixed)]:
        lines.append(row(label, [cell(r.get(key)) for _, _, r in columns]))
    lines.append(row("best fixed (workers)", [f"{r[b].rate:,.1f} ({b})" if b else "-"
                                              for (_, _, r), b in zip(columns, bests, strict=True)]))
    for label, key in [("defaults / best fixed", "best"), ("defaults / serial", "serial"),
                       *((f"defaults / tcl, {t.label.split(', ')[1]}", t.key) for t in scripts),
                       *(("defaults / C spawner", k) for _, k in spawner)]:
        values = []
        for (_, _, r), b in zip(columns, bests, strict=True):
            x = ratio(r.get("default"), r.get(b if key == "best" else key))
            values.append("-" if x is None else f"{x:.2f}")
        lines.append(row(label, values))
    return lines


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(args) -> int:
    choices = (*systems.NAMES, "tempfail", "latency")
    names = args.real or choices
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise SystemExit(f"bench: unknown --real system {unknown[0]!r} (choose from {' '.join(choices)})")
    if args.repeat < 1:
        raise SystemExit("bench: --repeat takes a number of rounds, 1 or more")
    try:
        args.fixed = [int(w) for w in args.fixed.split(",")] if args.fixed else list(FIXED)
        if not all(w > 0 for w in args.fixed):
            raise ValueError
    except ValueError:
        raise SystemExit(f"bench: --fixed takes positive numbers separated by commas, not {args.fixed!r}") from None
    tmp = Path(tempfile.mkdtemp(prefix="mailrelayd-bench-real-"))
    started = time.monotonic()
    sink = build_c(tmp, "sink")
    scripts, found = tcl.find_scripts(args.tcl_script)
    why_not = tcl.check_tclsh() if scripts else None
    tools = {"tcl": [] if why_not else scripts, "spawn": build_c(tmp, "spawn")}
    print(f"mailrelayd bench --real: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"SQLite {sqlite3.sqlite_version}, temp {tmp}\nload average before: {load()}", flush=True)
    print(*(f"{line}{'; skipped: ' + why_not if why_not else ''}" for line in found), sep="\n", flush=True)
    columns, notes, fail = [], [], []
    for name in (n for n in names if n not in ("tempfail", "latency")):
        n = systems.messages_for(name, args.messages, args.quick)
        try:
            with systems.open_system(name, tmp, sink) as system:
                print(f"{system.label}: {system.describe}, {n:,} messages", flush=True)
                columns.append((system, n, measure(system, n, args, tmp, tools)))
        except systems.Unavailable as e:
            notes.append(f"{name}: skipped: {e}")
        except (RuntimeError, SystemExit) as e:  # a Postfix or smtp-sink that would not start
            fail.append(f"{name}: could not run: {e}")
    failure = lat = None
    for name in ("tempfail", "latency"):
        if name in names and not sink:
            notes.append(f"{name}: skipped: no C compiler to build bench/sink.c")
    if "tempfail" in names and sink:
        failure = tempfail.measure(tmp, sink, fresh_queue)
    if "latency" in names and sink:
        lat = targets.measure(tmp, sink, args.quick)
    fail += report(columns, notes, failure, lat, args, tools["tcl"])
    print(f"\nload average after: {load()}; whole run {time.monotonic() - started:.0f} s")
    return verdict(fail, tmp, args.keep)


def report(columns: list, notes: list[str], failure: dict | None, lat: dict | None, args,
           scripts: list[tcl.Script]) -> list[str]:
    """Print the table, the notes, the failure and latency runs and the targets; what failed or missed."""
    fail = []
    if columns:
        rounds = "one round" if args.repeat == 1 else f"the best of {args.repeat} rounds"
        print(f"\n== Side by side: the same messages per system, each consumer in turn, {rounds} ==")
        print(*table(columns, args.fixed, scripts), sep="\n")
        print("msg/s: messages / wall time from process start to end, start-up included; * = its check failed.")
        for s, _, runs in columns:
            print(f"  {s.label}: {s.describe}")
            fail += [f"{s.label}, {key}: {r.check}" for key, r in runs.items() if r.rate is not None and not r.good]
    for note in notes:
        print(note)
    if failure:
        print(*tempfail.report(failure), sep="\n")
        if failure["error"]:
            fail.append(f"tempfail: {failure['error']}")
    if lat:
        print(*targets.report(lat), sep="\n")
        if lat["error"]:
            fail.append(lat["error"])
    lines = targets.summary(columns, failure, lat, args.fixed)
    if lines:
        print(f"\n== Targets (issue 13), on this machine (load average now {load()}) ==")
        print(*(line for _, line in lines), sep="\n")
        fail += [line[6:] for met, line in lines if met is False]
    return fail
