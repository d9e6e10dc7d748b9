"""What the commands share: a parser whose errors are one line and exit 64, the
configuration keys as flags, and loading the configuration they name."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from mailrelayd.config import DEFAULT_CONFIG, OPTIONS, Config, ConfigError, build, read_toml

# The settings that say which queue, how to open it and as whom: the only ones the queue
# commands take (and allow_root, for those that write).
QUEUE_KEYS = ("db", "spool", "state_dir", "settle", "keep_sent", "max_size", "spool_owner", "sentlog_retention",
              "user")


class Parser(argparse.ArgumentParser):
    """argparse with no abbreviations (`--smtp-password SECRET` must never be taken for
    `--smtp-password-file`) whose usage errors are one line naming the options, never
    echoing their values (a secret?), with the usage, and exit status 64."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            unknown = [a.split("=", 1)[0] for a in message.split(": ", 1)[1].split() if a.startswith("-")]
            message = "unknown option " + ", ".join(unknown) if unknown else "unexpected arguments"
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        self.exit(os.EX_USAGE, f"{self.prog}: {message} (usage: {usage}; see --help)\n")


def add_config_options(parser: argparse.ArgumentParser, keys: Iterable[str] | None = None) -> None:
    """--config, and a flag for each configuration key (all of them, or `keys`)."""
    parser.add_argument("--config", metavar="FILE", help=f"TOML configuration (default: {DEFAULT_CONFIG} if it exists)")
    wanted = None if keys is None else set(keys)
    for option in OPTIONS:
        if wanted is not None and option.key not in wanted:
            continue
        flag = "--" + option.key.replace("_", "-")
        if option.metavar:
            parser.add_argument(flag, dest=option.key, metavar=option.metavar, help=option.help,
                                default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=option.key, action="store_const", const=True, help=option.help,
                                default=argparse.SUPPRESS)


def load(args: argparse.Namespace) -> Config:
    """The Config from the file (--config, else /etc/mailrelayd.toml if it exists) and the flags."""
    flags = {o.key: getattr(args, o.key) for o in OPTIONS if hasattr(args, o.key)}
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    file_values = read_toml(path) if args.config or DEFAULT_CONFIG.exists() else {}
    return build(file_values, flags, source=str(path))


def fail(message: str, status: int) -> int:
    """Print one line on stderr; return `status` (to be returned by the command)."""
    print(f"mailrelayd: {message}", file=sys.stderr)
    return status


def become_user(config: Config, read_only: bool = False) -> int | None:
    """Switch to the configured user now, as mailrelayd.privileges says (a command that
    only reads may stay root); None, or the exit status (78) of a refusal, after its line."""
    from mailrelayd import privileges

    try:
        privileges.switch(privileges.plan(config, read_only))
    except privileges.PrivilegeError as e:
        return fail(str(e), os.EX_CONFIG)
    return None


def parse_and_load(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, Config] | int:
    """Parse `argv` and load the configuration; an int is the exit status of a bad one (78)."""
    args = parser.parse_args(argv)
    try:
        return args, load(args)
    except ConfigError as e:
        return fail(str(e), os.EX_CONFIG)
