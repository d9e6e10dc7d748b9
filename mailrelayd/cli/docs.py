"""The manual pages and the bash completion, written from the one place each option is
declared: the command line's parsers (mailrelayd.cli.parsers), the configuration's option
table (mailrelayd.config.OPTIONS) and the injector's (mailrelayd.inject.OPTIONS). They
cannot drift from the program: `python3 -m mailrelayd.cli.docs OUTDIR` writes

    OUTDIR/mailrelayd.8, OUTDIR/mailrelayd-sendmail.8, OUTDIR/mailrelayd.toml.5
    OUTDIR/mailrelayd (bash completion)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mailrelayd import __version__, inject
from mailrelayd.cli import parsers
from mailrelayd.config import DEFAULT_CONFIG, OPTIONS, PROCESS_KEYS

QUEUE_COMMANDS = ("status", "list", "show", "retry", "purge", "check-config", "test-message")


def roff(text: str) -> str:
    """Text safe in a roff document: backslashes and minus signs escaped, no line taken
    for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.splitlines())


def _head(name: str, section: int, summary: str) -> list[str]:
    return [f'.TH {name.upper()} {section} "" "mailrelayd {__version__}" "mailrelayd"',
            ".SH NAME", f"{roff(name)} \\- {roff(summary)}"]


def _option(action: argparse.Action) -> list[str]:
    flags = ", ".join(f"\\fB{roff(flag)}\\fR" for flag in action.option_strings) or \
        f"\\fI{roff(str(action.metavar or action.dest))}\\fR"
    argument = f" \\fI{roff(str(action.metavar))}\\fR" if action.option_strings and action.nargs != 0 \
        and action.metavar else ""
    return [".TP", flags + argument, roff(action.help or "")]


def _own_actions(parser: argparse.ArgumentParser, shared: set[str]) -> list[argparse.Action]:
    return [a for a in parser._actions  # argparse keeps them nowhere public
            if not isinstance(a, argparse._HelpAction) and not set(a.option_strings) & shared]


def mailrelayd_8() -> str:
    found = parsers()
    daemon = found[""]
    shared = {s for a in daemon._actions for s in a.option_strings}
    lines = _head("mailrelayd", 8, "relay the mail that jailed web applications queue to the mail system")
    lines += [".SH SYNOPSIS", roff(daemon.usage or "mailrelayd")]
    for command in QUEUE_COMMANDS:
        lines += [".br", roff(found[command].usage or f"mailrelayd {command}")]
    lines += [".SH DESCRIPTION", roff(daemon.description or ""), ".PP",
              roff("Every option is also a key of the configuration file, mailrelayd.toml(5), with _ for -;"
                   f" flags win over the file ({DEFAULT_CONFIG} unless --config names another)."),
              ".SH OPTIONS"]
    for action in _own_actions(daemon, {"-h", "--help"}):
        lines += _option(action)
    lines += [".SH COMMANDS", roff("Each command takes the queue's options above (--db, --spool, --config,"
                                   " ...) besides its own.")]
    for command in QUEUE_COMMANDS:
        parser = found[command]
        lines += [".SS " + roff(command), roff(parser.description or "")]
        for action in _own_actions(parser, shared - {"--failed"}):
            lines += _option(action)
        lines += [".PP", roff(parser.epilog or "")]
    lines += [".SH EXIT STATUS AND SIGNALS", roff(daemon.epilog or ""),
              ".SH FILES", ".TP", roff(str(DEFAULT_CONFIG)), roff("the configuration, if it exists"),
              ".SH SEE ALSO", "\\fBmailrelayd.toml\\fR(5), \\fBmailrelayd\\-sendmail\\fR(8), \\fBsendmail\\fR(8),"
              " \\fBsqlite\\-utils\\fR(1), /usr/share/doc/mailrelayd/README.md"]
    return "\n".join(lines) + "\n"


def mailrelayd_toml_5() -> str:
    lines = _head("mailrelayd.toml", 5, "configuration of mailrelayd")
    lines += [".SH DESCRIPTION", roff(
        f"mailrelayd(8) reads its settings from a TOML file: {DEFAULT_CONFIG}, or the one --config names."
        " Each key has a command-line flag of the same name with - for _, which wins over the file. Durations"
        " are seconds or take a unit (300, 30s, 5m, 1h, 5d); sizes take K, M or G."),
        ".PP", roff("Several queues: [[queue]] tables, each naming one queue (db or spool, which may be a glob)"
                    " and any setting of its own; the top-level keys apply to every queue. The settings of the"
                    " whole process cannot be set in a table: " + ", ".join(sorted(PROCESS_KEYS)) + "."),
        ".SH KEYS"]
    for option in OPTIONS:
        value = f" = \\fI{roff(option.metavar)}\\fR" if option.metavar else " = true"
        lines += [".TP", f"\\fB{roff(option.key)}\\fR{value}", roff(option.help)]
    lines += [".SH EXAMPLE", ".nf", roff('db = "/srv/fossil/emailqueue.db"\ncommand = "/usr/bin/msmtp -t"\n'
                                        'notify_failed = "admin@example.org"\n\n[[queue]]\n'
                                        'spool = "/srv/trac/spool"'), ".fi",
              ".SH SEE ALSO", "\\fBmailrelayd\\fR(8)"]
    return "\n".join(lines) + "\n"


def mailrelayd_sendmail_8() -> str:
    lines = _head("mailrelayd-sendmail", 8, "queue a message in mailrelayd's spool, as sendmail would")
    lines += [".SH SYNOPSIS", roff("mailrelayd-sendmail [options] [--spool DIR] [--] [recipient ...]"),
              ".SH DESCRIPTION", roff(inject.__doc__ or ""),
              ".SH OPTIONS"]
    for letter, argument, what in inject.OPTIONS:
        lines += [".TP", f"\\fB\\-{letter}\\fR" + (f" \\fI{roff(argument)}\\fR" if argument else ""), roff(what)]
    lines += [".TP", "\\fB\\-\\-spool\\fR \\fIDIR\\fR", roff(
        f"the spool to queue into (else ${inject.SPOOL_ENV}, else {inject.DEFAULT_SPOOL})"),
        ".SH EXIT STATUS", ".TP", "0", "queued durably; nothing printed", ".TP", "64",
        roff("usage error: unknown option or mode, bad address, no recipients, message too large"),
        ".TP", "75", roff("try again later: the spool is missing, not writable, or full"),
        ".SH ENVIRONMENT", ".TP", roff(inject.SPOOL_ENV), "the spool directory, when --spool is not given",
        ".SH SEE ALSO", "\\fBmailrelayd\\fR(8), \\fBsendmail\\fR(8)"]
    return "\n".join(lines) + "\n"


def bash_completion() -> str:
    """Complete the commands, each one's options, and file names after those that take one."""
    found = parsers()
    cases, takes_file = [], set()
    for command, parser in found.items():
        words = " ".join(s for a in parser._actions for s in a.option_strings)
        if command == "":
            words = " ".join(QUEUE_COMMANDS) + " enqueue " + words
        takes_file |= {s for a in parser._actions for s in a.option_strings
                       if a.metavar in ("FILE", "DIR", "CMD")}
        label = command or '""'
        cases.append(f'        {label}) words="{words}" ;;')
    return "\n".join([
        "# bash completion for mailrelayd: written by `python3 -m mailrelayd.cli.docs` from its parsers",
        "_mailrelayd() {",
        "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} command=\"\" words",
        f'    case "$prev" in {"|".join(sorted(takes_file))}) COMPREPLY=($(compgen -f -- "$cur")); return ;; esac',
        "    [ \"$COMP_CWORD\" -gt 1 ] && command=${COMP_WORDS[1]}",
        '    case "$command" in',
        *cases,
        '        *) words="" ;;',
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        "complete -F _mailrelayd mailrelayd",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    out = Path((argv if argv is not None else sys.argv[1:] or ["."])[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "mailrelayd.8").write_text(mailrelayd_8())
    (out / "mailrelayd-sendmail.8").write_text(mailrelayd_sendmail_8())
    (out / "mailrelayd.toml.5").write_text(mailrelayd_toml_5())
    (out / "mailrelayd").write_text(bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main())
