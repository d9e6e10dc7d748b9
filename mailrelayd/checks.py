"""What `mailrelayd check-config` checks, as the user it runs as: that the configured way
to deliver and the queue are usable. It only looks: nothing is created, opened for
writing or changed (the SQLite file's header is read as bytes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mailrelayd.compose import make_transport
from mailrelayd.config import Config, ConfigError

SQLITE_MAGIC = b"SQLite format 3\x00"


def state_dir(config: Config) -> Path | None:
    """A spool's state directory, as the relay would use it."""
    if not config.spool:
        return None
    spool = config.spool.absolute()
    return (config.state_dir or spool.with_name(spool.name + ".mailrelayd")).absolute()


def _writable_dir(path: Path, what: str) -> str | None:
    """None if `path` is a directory this user can list and create files in, else the problem."""
    if not path.exists():
        return f"{what} {path}: no such directory"
    if not path.is_dir():
        return f"{what} {path}: not a directory"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return f"{what} {path}: not writable by this user"
    return None


def _command_problem(program: str) -> str | None:
    found = shutil.which(program) if "/" not in program else program
    if found is None or not os.path.exists(found):
        return f"command {program}: no such file" + ("" if "/" in program else " in PATH")
    if not os.path.isfile(found):
        return f"command {found}: not a file"
    if not os.access(found, os.X_OK):
        return f"command {found}: not executable by this user"
    return None


def transport_problems(config: Config) -> list[str]:
    if config.maildir:
        maildir = config.maildir.absolute()
        if maildir.exists():
            problem = _writable_dir(maildir, "maildir")
        else:
            problem = _writable_dir(maildir.parent, "maildir's parent")
        return [problem] if problem else []
    if not config.smtp.server:
        problem = _command_problem(config.command[0])
        return [problem] if problem else []
    problems = []
    for key, path in (("smtp_password_file", config.smtp.password_file), ("smtp_ca_file", config.smtp.ca_file)):
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            problems.append(f"{key} {path}: " + ("not readable by this user" if path.exists() else "no such file"))
    if not problems:
        try:
            make_transport(config).close()  # the SMTP settings' own checks; reads the password, prints nothing
        except ConfigError as e:
            problems.append(str(e))
    return problems


def queue_problems(config: Config) -> list[str]:
    if config.db:
        db = config.db.absolute()
        problem = _writable_dir(db.parent, "queue directory")  # SQLite writes its journal beside the file
        if problem:
            return [problem] + ([] if db.parent.exists() else [f"queue {db}: no such file"])
        if not db.exists():
            return [f"queue {db}: no such file"]
        if not db.is_file():
            return [f"queue {db}: not a file"]
        if not os.access(db, os.R_OK | os.W_OK):
            return [f"queue {db}: not readable and writable by this user"]
        try:
            with open(db, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            return [f"queue {db}: cannot read: {e.strerror}"]
        if head and head != SQLITE_MAGIC:
            return [f"queue {db}: not a SQLite database"]
        return []
    assert config.spool is not None
    spool, state = config.spool.absolute(), state_dir(config)
    assert state is not None
    problem = _writable_dir(spool, "spool")
    if problem:
        return [problem]
    problems = []
    existing = state if state.exists() else state.parent
    problem = _writable_dir(existing, "state_dir" if existing == state else "state_dir's parent")
    if problem:
        problems.append(problem)
    elif existing.stat().st_dev != spool.stat().st_dev:
        problems.append(f"state_dir {state}: not on the same file system as the spool {spool}"
                        " (moves would not be atomic)")
    return problems
