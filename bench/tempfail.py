"""How fast mailrelayd's concurrency falls once the mail system starts failing temporarily.

Part of `bench.py --real` (`--real tempfail` alone): a queue of 6,000 messages is drained
by mailrelayd with its defaults into bench/sink.c waiting 50 ms per message. After the
deliveries have run for RAMP seconds, the bench creates the sink's SINK_FAIL_FLAG file:
from then on every delivery ends with exit 75 (EX_TEMPFAIL, "try again later"), after the
same 50 ms. WINDOW seconds later the relay gets SIGTERM.

The sink logs each delivery's start and end (SINK_LOG), so the number of deliveries in
flight at any instant is known without asking the relay. Reported: the mean in flight
over each 0.5 s, from 2 s before the failures on; the level in the second before them;
how long after the first failure the number in flight fell to half that level or lower,
judged on its mean over SPAN (1 s) so that a brief stall of a busy machine does not count
(the issue's target: "within a few seconds"); and the failing attempts made during the
window (how hard a failing mail system is hammered).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from bench import ENV, ROOT, message, relay_cmd

MESSAGES, DELAY_MS, RAMP, WINDOW, BUCKET = 6000, 50, 2.5, 6.0, 0.5
SPAN = 1.0  # seconds: the fall is judged on the mean over this long
TARGET_FALL = 5.0  # seconds: "within a few seconds"


def in_flight(spans: list[tuple[float, float, int]], t0: float, t1: float) -> float:
    """The mean number of deliveries running during [t0, t1)."""
    busy = sum(max(0.0, min(end, t1) - max(start, t0)) for start, end, _ in spans)
    return busy / (t1 - t0)


def measure(tmp: Path, sink: str, fresh_queue, messages: int = MESSAGES) -> dict:
    """Run the schedule above; the figures as a dict (`error` set if the run went wrong)."""
    db, log = tmp / "tempfail.db", tmp / "tempfail.log"
    spans_log, flag = tmp / "tempfail-sink.log", tmp / "tempfail.flag"
    fresh_queue(db, [message(i, "tempfail") for i in range(messages)])
    env = {**ENV, "SINK_DELAY_MS": str(DELAY_MS), "SINK_LOG": str(spans_log), "SINK_FAIL_FLAG": str(flag)}
    argv = relay_cmd(["--db", str(db)], ["--command", f"{sink} -ti"], None, True)
    ended = None
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, env=env, stderr=err, cwd=ROOT)
        deadline = time.monotonic() + 30
        while not (spans_log.exists() and spans_log.stat().st_size):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return {"error": f"no delivery started within 30 s; see {log}"}
            time.sleep(0.01)
        time.sleep(RAMP)  # the schedule: RAMP seconds of normal deliveries (not a synchronisation)
        flag.touch()
        failing_from = time.time()
        try:
            proc.wait(WINDOW)
            ended = time.time() - failing_from
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    spans = []
    for line in spans_log.read_text().splitlines():
        start, end, status, _ = line.split(" ", 3)
        spans.append((float(start), float(end), int(status)))
    before = in_flight(spans, failing_from - 1.0, failing_from)
    series = [in_flight(spans, failing_from + k * BUCKET, failing_from + (k + 1) * BUCKET)
              for k in range(int(-2.0 / BUCKET), int(WINDOW / BUCKET))]
    fell = next((k * 0.1 for k in range(int((WINDOW - SPAN) / 0.1) + 1)
                 if in_flight(spans, failing_from + k * 0.1, failing_from + k * 0.1 + SPAN) <= before / 2), None)
    failed = sum(1 for start, _, status in spans if status == 75 and start < failing_from + WINDOW)
    return {"before": before, "series": series, "fell": fell, "failed": failed, "ended": ended,
            "sent": sum(1 for *_, status in spans if status == 0), "error": None}


def report(r: dict) -> list[str]:
    """The section's lines for the bench's output."""
    lines = [f"\n== Temporary failures: {DELAY_MS} ms sink, exit 75 from {RAMP:g} s after the first delivery on, "
             f"mailrelayd --drain with its defaults, {MESSAGES:,} messages =="]
    if r["error"]:
        return [*lines, f"FAILED: {r['error']}"]
    cut = int(2.0 / BUCKET)

    def series(part: list[float]) -> str:
        return " ".join(f"{x:.1f}" for x in part)

    lines.append(f"in flight, mean per {BUCKET:g} s, 2 s before | after the failures start: "
                 f"{series(r['series'][:cut])} | {series(r['series'][cut:])}")
    fell = (f"fell to half ({r['before'] / 2:.1f}) or lower, over {SPAN:g} s, {r['fell']:.1f} s after the "
            "failures started"
            if r["fell"] is not None else f"did not fall to half ({r['before'] / 2:.1f}) within {WINDOW:g} s")
    lines.append(f"in flight in the second before: {r['before']:.1f}; {fell}")
    window = r["ended"] if r["ended"] is not None else WINDOW
    lines.append(f"failing attempts: {r['failed']} in {window:.1f} s ({r['failed'] / window:.0f}/s); "
                 f"sent before the failures: {r['sent']}"
                 + (f"; the drain ended by itself after {r['ended']:.1f} s" if r["ended"] is not None else ""))
    return lines
