"""What `mailrelayd check-config` checks, as the user it runs as: that the configured way
to deliver and the queue are usable. It only looks: nothing is created, opened for
writing or changed (the SQLite file's header is read as bytes)."""

from __future__ import annotations

import os
import shutil
import stat
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


class _Unreachable(Exception):
    """A path this user cannot even look at; the message is the problem's line."""


def _stat(path: Path, what: str) -> os.stat_result | None:
    """The status of `path` (links followed), or None if nothing is there; _Unreachable if
    this user cannot look (a directory on its path does not let it in)."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise _Unreachable(f"{what} {path}: not reachable by this user (a directory on its path does not let"
                           " it in)") from None
    except OSError as e:
        raise _Unreachable(f"{what} {path}: {e.strerror or e}") from None


def _writable_dir(path: Path, what: str) -> str | None:
    """None if `path` is a directory this user can list and create files in, else the problem."""
    st = _stat(path, what)
    if st is None:
        return f"{what} {path}: no such directory"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {path}: not a directory"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return f"{what} {path}: not writable by this user"
    return None


def _command_problem(program: str) -> str | None:
    found = shutil.which(program) if "/" not in program else program
    st = None if found is None else _stat(Path(found), "command")
    if found is None or st is None:
        return f"command {program}: no such file" + ("" if "/" in program else " in PATH")
    if not stat.S_ISREG(st.st_mode):
        return f"command {found}: not a file"
    if not os.access(found, os.X_OK):
        return f"command {found}: not executable by this user"
    return None


def transport_problems(config: Config) -> list[str]:
    """What keeps the configured transport from working for this user (each one line)."""
    try:
        return _transport_problems(config)
    except _Unreachable as e:
        return [str(e)]


def queue_problems(config: Config) -> list[str]:
    """What keeps the queue from being relayed by this user (each one line)."""
    try:
        return _queue_problems(config)
    except _Unreachable as e:
        return [str(e)]


def _transport_problems(config: Config) -> list[str]:
    if config.maildir:
        maildir = config.maildir.absolute()
        if _stat(maildir, "maildir") is not None:
            problem = _writable_dir(maildir, "maildir")
        else:
            problem = _writable_dir(maildir.parent, "maildir's parent")
        return [problem] if problem else []
    if not config.smtp.server:
        problem = _command_problem(config.command[0])
        return [problem] if problem else []
    problems = []
    for key, path in (("smtp_password_file", config.smtp.password_file), ("smtp_ca_file", config.smtp.ca_file)):
        if path is None:
            continue
        try:
            st = _stat(path, key)
        except _Unreachable as e:
            problems.append(str(e))
            continue
        if st is None:
            problems.append(f"{key} {path}: no such file")
        elif not (stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK)):
            problems.append(f"{key} {path}: not readable by this user")
    if not problems:
        try:
            make_transport(config).close()  # the SMTP settings' own checks; reads the password, prints nothing
        except ConfigError as e:
            problems.append(str(e))
    return problems


def _queue_problems(config: Config) -> list[str]:
    if config.db:
        db = config.db.absolute()
        problem = _writable_dir(db.parent, "queue directory")  # SQLite writes its journal beside the file
        if problem:
            return [problem] + ([] if _stat(db.parent, "queue directory") else [f"queue {db}: no such file"])
        st = _stat(db, "queue")
        if st is None:
            return [f"queue {db}: no such file"]
        if not stat.S_ISREG(st.st_mode):
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
    existing = state if _stat(state, "state_dir") is not None else state.parent
    problem = _writable_dir(existing, "state_dir" if existing == state else "state_dir's parent")
    if problem:
        return [problem]
    if os.stat(existing).st_dev != os.stat(spool).st_dev:
        return [f"state_dir {state}: not on the same file system as the spool {spool} (moves would not be atomic)"]
    return []
