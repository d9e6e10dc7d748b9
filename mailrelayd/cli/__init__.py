"""The `mailrelayd` command line, a thin layer over the composition root (mailrelayd.compose).

One module per command group: `daemon` (the relay itself and `--drain`), `queue` (status,
list, show, retry, purge), `setup` (check-config, test-message); `enqueue` is the injector
(mailrelayd.inject). Each only parses arguments and formats results. Nothing imports this
package; each command's module is imported only when that command runs (start-up time).
"""

from __future__ import annotations

import argparse
import signal
import sys

QUEUE_COMMANDS = ("status", "list", "show", "retry", "purge")
SETUP_COMMANDS = ("check-config", "test-message")


def run() -> int:
    """The program's entry point: `main` with the process set up as a command line tool's."""
    if sys.argv[1:2] and sys.argv[1] in QUEUE_COMMANDS:
        # Output piped into `head` and closed: end quietly, as Unix tools do (each retry or
        # purge step is complete in itself, so stopping between two is safe).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return main(sys.argv[1:])


def main(argv: list[str]) -> int:
    """Run the command `argv` names; its exit status."""
    command = argv[0] if argv else ""
    if command == "enqueue":  # the sendmail-compatible injector, also `mailrelayd-sendmail`
        from mailrelayd import inject

        return inject.main(argv[1:])
    if command in QUEUE_COMMANDS:
        from mailrelayd.cli import queue

        return queue.main(command, argv[1:])
    if command in SETUP_COMMANDS:
        from mailrelayd.cli import setup

        return setup.main(command, argv[1:])
    from mailrelayd.cli import daemon

    return daemon.main(argv)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, by command ("" for the relay itself): the one place the
    options are declared, for the manual pages and shell completion."""
    from mailrelayd.cli import daemon, queue, setup

    found = {"": daemon.parser()}
    found.update({c: queue.parser(c) for c in QUEUE_COMMANDS})
    found.update({c: setup.parser(c) for c in SETUP_COMMANDS})
    return found
