"""The cost of one log line: `message_sent` with typical values, into a file sink.

Run by hand, from the repository root: `python bench/log_cost.py [--format json|console]`.
The relay logs one such line per message, at over 1,500 messages a second on a 2-core
machine, so this is the per-message price of logging. It also prints the cost of a line
whose subject and recipient hold bytes that were not UTF-8 and escape sequences, which
must be escaped (never dropped, never raised), for comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelayd import log  # noqa: E402

TYPICAL = dict(outcome="sent", emailid=123456, to="alice@example.org",
               subject="[Fossil] New forum post: build fails on arm64", size=2841, attempt=1, ms=12.3)
HOSTILE = dict(TYPICAL, to="al\udcffce@example.org", subject="\x1b]52;c;ZWNobyBoaQ==\x07 \u202eFossil\r\u2028")


def cost(values: dict, number: int, repeat: int) -> float:
    """The best of `repeat` runs, in microseconds of CPU time (this process's, user and system:
    other jobs on the machine count less than in wall time) per call."""
    logger = log.get_logger(queue="/srv/fossil/emailqueue.db")
    runs = timeit.repeat(lambda: logger.info("message_sent", **values), number=number, repeat=repeat,
                         timer=time.process_time)
    return min(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("json", "console"), default="json")
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mailrelayd.log"
        log.configure(args.format, log_file=path)
        typical = cost(TYPICAL, args.number, args.repeat)
        hostile = cost(HOSTILE, args.number, args.repeat)
        lines = len(path.read_text(errors="replace").splitlines())
        log.configure("json")
    calls = 2 * args.number * args.repeat
    print(f"{args.format} to a file: {typical:.1f} us CPU per typical line, {hostile:.1f} us per hostile line"
          f" ({lines} of {calls} lines written)")


if __name__ == "__main__":
    main()
