"""The SMTP mode of bench/bench.py (`python bench/bench.py --smtp [--messages N] [--workers W]`).

All three senders deliver the same Fossil-style messages (bench.message) to one Postfix
`smtp-sink` on loopback, started here on a free port (`-u nobody` as root), in one run:

1. mailrelayd: a fresh emailqueue.db holding N messages (default 10,000) drained by
   `python -m mailrelayd --drain --db DB --smtp-server 127.0.0.1 --smtp-port P --use-tls none
   --workers W`. Wall time includes interpreter start-up; steady/s is first to last
   message_sent. Afterwards the email table must be empty, sentlog must hold N rows, and
   the sink's message counter must have grown by N.
2. Baseline: a plain Python smtplib loop over one persistent connection (sendmail() per
   message, lock-step, no pipelining), the same N messages.
3. Baseline: the serial pipe to `msmtp -t` (an msmtprc pointing at the sink), one process
   per message as mailrelayd's pipe transport would run it, on a sample (default 300),
   extrapolated as msg/s.

Targets: mailrelayd (steady, as the loop has no start-up to pay) >= the smtplib loop, and
>= 10x the msmtp pipe.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ENV, ROOT, counts, fresh_db, message, relay_cmd, sent_stamps, steady_rate, verdict

SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "noreply@example.org"
MSMTP_TARGET = 10.0


class Sink:
    """Postfix's smtp-sink on 127.0.0.1 (free port), its running counters in a file."""

    def __init__(self, tmp: Path):
        if not os.access(SMTP_SINK, os.X_OK):
            raise SystemExit(f"{SMTP_SINK} not found (apt-get install postfix)")
        with socket.create_server(("127.0.0.1", 0)) as s:
            self.port = s.getsockname()[1]
        self.out = tmp / "smtp-sink.out"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen([SMTP_SINK, *user, "-c", f"127.0.0.1:{self.port}", "1000"],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"smtp-sink did not start: {self.out.read_text(errors='replace')}")
                time.sleep(0.02)

    def messages(self) -> int:
        """The sink's message counter (`mesg=`), updated at each final '.'."""
        found = re.findall(rb"mesg=(\d+)", self.out.read_bytes())
        return int(found[-1]) if found else 0

    def wait_for(self, total: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while (seen := self.messages()) < total and time.monotonic() < deadline:
            time.sleep(0.02)
        return seen

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def smtplib_loop(port: int, msgs: list[bytes]) -> float:
    """One smtplib connection, sendmail() per message: messages per second."""
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example") as smtp:
        for i, m in enumerate(msgs):
            smtp.sendmail(SENDER, [f"user{i}@example.com"], m)
    return len(msgs) / (time.perf_counter() - t0)


def msmtp_pipe(tmp: Path, port: int, msgs: list[bytes]) -> float:
    """`msmtp -t` run once per message, serially: messages per second."""
    msmtp = shutil.which("msmtp")
    if not msmtp:
        raise SystemExit("msmtp not found (apt-get install msmtp)")
    rc = tmp / "msmtprc"
    rc.write_text(f"defaults\nauth off\ntls off\nsyslog off\naccount default\nhost 127.0.0.1\nport {port}\n"
                  f"domain bench.example\nfrom {SENDER}\n")
    rc.chmod(0o600)
    t0 = time.perf_counter()
    for m in msgs:
        subprocess.run([msmtp, "-C", str(rc), "-t", "-f", SENDER], input=m, check=True)
    return len(msgs) / (time.perf_counter() - t0)


def mailrelayd(tmp: Path, port: int, msgs: list[bytes], workers: int) -> dict:
    db, log = tmp / "smtp.db", tmp / "smtp.log"
    fresh_db(db, msgs)
    cmd = relay_cmd(["--db", str(db)], ["--smtp-server", "127.0.0.1", "--smtp-port", str(port), "--use-tls", "none"],
                    workers, True)
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=ENV, cwd=ROOT, stderr=err).returncode
        seconds = time.perf_counter() - t0
    email, sent = counts(db)
    return {"rc": rc, "seconds": seconds, "rate": len(msgs) / seconds, "steady": steady_rate(log),
            "logged": len(sent_stamps(log)), "email": email, "sentlog": sent}


def main(args) -> int:
    n = args.messages
    sample = min(300, n)
    tmp = Path(tempfile.mkdtemp(prefix="mailrelayd-bench-smtp-"))
    msgs = [message(i, "smtp") for i in range(n)]
    sink = Sink(tmp)
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"mailrelayd bench --smtp: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"smtp-sink on 127.0.0.1:{sink.port}, {n:,} messages, temp {tmp}", flush=True)
    print(f"load average before: {load()}", flush=True)
    fail = []
    try:
        loop = smtplib_loop(sink.port, msgs)
        expected = n
        loop_check = "sink counted all" if sink.wait_for(expected) == expected else "FAIL"
        if loop_check != "sink counted all":
            fail.append(f"smtplib loop: the sink counted {sink.messages()} of {expected} messages")
        print(f"  done: smtplib loop {loop:,.0f} msg/s", flush=True)

        r = mailrelayd(tmp, sink.port, msgs, args.workers)
        expected += n
        got = sink.wait_for(expected) - (expected - n)
        print(f"  done: mailrelayd {r['rate']:,.0f} msg/s", flush=True)

        pipe = msmtp_pipe(tmp, sink.port, msgs[:sample])
        expected += sample
        if sink.wait_for(expected) != expected:
            fail.append(f"msmtp pipe: the sink counted {sink.messages() - expected + sample} of {sample}")
        print(f"  done: msmtp -t pipe {pipe:,.0f} msg/s", flush=True)
    finally:
        sink.stop()
    check = "ok"
    if (r["rc"], r["email"], r["sentlog"], got) != (0, 0, n, n):
        check = f"FAIL (exit {r['rc']}, email {r['email']}, sentlog {r['sentlog']}, sink got {got})"
        fail.append(f"mailrelayd: {check}")

    print(f"\n== SMTP: {n:,} Fossil-style messages to Postfix's smtp-sink on loopback ==")
    print(f"{'sender':<36}{'msgs':>7}{'seconds':>9}{'msg/s':>9}{'steady/s':>10}{'x smtplib':>10}{'x msmtp':>9}  check")
    print(f"{'smtplib loop, 1 connection':<36}{n:>7}{n / loop:>9.2f}{loop:>9,.0f}{'-':>10}{1:>10.2f}"
          f"{loop / pipe:>9.1f}  {loop_check}")
    print(f"{'msmtp -t pipe, serial (sample)':<36}{sample:>7}{sample / pipe:>9.2f}{pipe:>9,.0f}{'-':>10}"
          f"{pipe / loop:>10.2f}{1:>9.1f}  extrapolated from {sample}")
    print(f"{f'mailrelayd --drain, {args.workers} workers':<36}{n:>7}{r['seconds']:>9.2f}{r['rate']:>9,.0f}"
          f"{r['steady']:>10,.0f}{r['rate'] / loop:>10.2f}{r['rate'] / pipe:>9.1f}  {check}")
    print("mailrelayd msg/s includes interpreter start-up; steady/s is first to last message_sent.")
    print("The smtplib loop runs inside this already-started process (no start-up, no imports), so the")
    print("target compares it with mailrelayd's steady/s; msg/s is shown for both.")
    print(f"load average after: {load()}")
    if r["steady"] < loop:
        fail.append(f"mailrelayd {r['steady']:,.0f} msg/s steady < smtplib loop {loop:,.0f} msg/s")
    if r["rate"] < MSMTP_TARGET * pipe:
        fail.append(f"mailrelayd {r['rate']:,.0f} msg/s < {MSMTP_TARGET:g}x the msmtp pipe ({pipe:,.0f} msg/s)")
    print(f"\nTargets: mailrelayd >= the smtplib loop; >= {MSMTP_TARGET:g}x the msmtp -t pipe; queue empty, "
          "sentlog = messages.")
    return verdict(fail, tmp, args.keep)
