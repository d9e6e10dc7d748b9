"""The targets of issue 13, each printed against its figure, PASS or MISS, by `bench.py --real`.

Besides the side-by-side table (real.py) and the failure run (tempfail.py), `--real` runs
`latency` (also alone: `--real latency`), two runs of mailrelayd with its defaults:

- a drain of LOCK_MESSAGES messages into the C sink beside bench.py's write-lock prober
  (a process looping BEGIN IMMEDIATE; COMMIT with busy_timeout 5000, as a Fossil insert
  would wait): the longest write lock while the relay goes as fast as it can;
- bench.latency: the daemon on an idle queue, LATENCY_MESSAGES messages inserted one at a
  time as Fossil does (own connection, INSERT, commit) every 20 ms; the sink logs when it
  started, so commit -> hand-off is measured outside the relay; the prober runs there too.

`summary` turns the figures of every part into one line per target.
"""

from __future__ import annotations

import math
from pathlib import Path

from tempfail import TARGET_FALL  # in-flight deliveries fall to half within this many seconds

from bench import TARGET_LOCK_MS, Prober, SqliteMode, counts, drain, latency, message

LOCK_MESSAGES, LATENCY_MESSAGES, EVERY = 3000, 200, 0.020
TARGET_BEST, TARGET_SPAWNER = 0.90, 1.3  # defaults / best fixed --workers; defaults / C spawner
TARGET_IDLE_P99_MS = 10.0  # issue 13, on an idle queue (bench.py's own latency check allows 100 ms)


def measure(tmp: Path, sink: str, quick: bool) -> dict:
    """The write-lock drain and the latency run; their figures (`error` set if either went wrong)."""
    mode = SqliteMode(tmp, None)
    n = 500 if quick else LOCK_MESSAGES
    queue = mode.fresh("lock", [message(i, "lock") for i in range(n)])
    r = drain(queue, Prober(tmp / "lock.db"), sink, None, tmp / "lock.log")
    email, sent = counts(tmp / "lock.db")
    error = None if r["rc"] == 0 and (email, sent) == (0, n) else \
        f"lock drain: exit {r['rc']}, email {email}, sentlog {sent} (of {n})"
    lat = latency(mode, sink, 50 if quick else LATENCY_MESSAGES, EVERY, workers=None)
    if lat["delivered"] < lat["count"] or lat["rc"] != 0:
        error = f"latency run: {lat['delivered']} of {lat['count']} delivered, exit {lat['rc']} on SIGTERM"
    return {"drain": r, "drain_n": n, "latency": lat, "error": error}


def report(r: dict) -> list[str]:
    """The section's lines for the bench's output."""
    d, lat = r["drain"], r["latency"]
    lines = ["\n== Idle queue and write lock: mailrelayd with its defaults, C sink, SQLite queue ==",
             f"drain of {r['drain_n']:,} beside the prober: {r['drain_n'] / d['seconds']:,.0f} msg/s; longest "
             f"write lock {d['watch']['max_ms']:.1f} ms ({d['watch']['slow']} waits >= 8 ms, {d['watch']['busy']} busy,"
             f" {d['watch']['probes']} probes)",
             f"daemon, {lat['count']} messages inserted one at a time every {EVERY * 1000:g} ms: commit -> sink start "
             f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms; longest write lock "
             f"{lat['watch']['max_ms']:.1f} ms ({lat['watch']['busy']} busy)"]
    return lines + ([f"FAILED: {r['error']}"] if r["error"] else [])


def _line(ok: bool | None, text: str) -> tuple[bool | None, str]:
    return ok, f"{'PASS' if ok else 'MISS' if ok is not None else 'n/a '}  {text}"


def summary(columns: list, failure: dict | None, lat: dict | None, fixed: list[int]) -> list[tuple[bool | None, str]]:
    """(met, line) per target: met is None when the figure could not be measured."""
    out = []
    for system, _, runs in columns:
        default = runs.get("default")
        good = [runs[f"w{w}"] for w in fixed if f"w{w}" in runs and runs[f"w{w}"].good]
        best = max(good, key=lambda r: r.rate, default=None)
        label = f"{system.label}: defaults {default.rate:,.1f} msg/s" if default and default.good else system.label
        if default is None or not default.good or best is None:
            out.append(_line(None, f"{label}: defaults >= {TARGET_BEST:g}x the best fixed --workers (a run failed)"))
        else:
            x = default.rate / best.rate
            workers = next(w for w in fixed if runs.get(f"w{w}") is best)
            out.append(_line(x >= TARGET_BEST, f"{label} = {x:.3f}x the best fixed (--workers {workers}, "
                                               f"{best.rate:,.1f} msg/s); target >= {TARGET_BEST:g}x"))
        spawner = runs.get("spawner")
        if spawner is not None:
            x = default.rate / spawner.rate if default and default.good and spawner.good else math.nan
            out.append(_line(None if math.isnan(x) else x >= TARGET_SPAWNER,
                             f"{system.label}: defaults = {x:.3f}x the serial C spawner ({spawner.rate:,.1f} msg/s), "
                             f"start-up included; target >= {TARGET_SPAWNER:g}x"))
    if failure is not None:
        fell = failure.get("fell")
        ok = None if failure.get("error") else fell is not None and fell <= TARGET_FALL
        said = "did not fall" if fell is None else f"fell to half {fell:.1f} s"
        out.append(_line(ok, f"temporary failures: in-flight deliveries {said} after they started; "
                             f"target within {TARGET_FALL:g} s"))
    if lat is not None:
        p99, locks = lat["latency"]["p99"], [lat["drain"]["watch"], lat["latency"]["watch"]]
        longest = max(w["max_ms"] for w in locks)
        out.append(_line(None if lat["error"] or math.isnan(p99) else p99 < TARGET_IDLE_P99_MS,
                         f"idle queue: p99 commit -> hand-off {p99:.1f} ms; target < {TARGET_IDLE_P99_MS:g} ms"))
        out.append(_line(None if lat["error"] else longest < TARGET_LOCK_MS and not any(w["busy"] for w in locks),
                         f"longest write lock {longest:.1f} ms (drain and idle queue), "
                         f"{sum(w['busy'] for w in locks)} SQLITE_BUSY; target < {TARGET_LOCK_MS:g} ms, none busy"))
    return out
