"""Who mailrelayd relays as: the switch from root to `user`, and the refusal to relay as root.

Started as root, a relay (the daemon, `--drain`, and the admin commands that write)
switches to `user` and its groups once what needs root is open (the log file, the
pidfile) and before anything touches a queue; without `user` it refuses, unless
`allow_root`. Not started as root, `user` must be who it runs as already. The commands
that only read may run as root; with `user` they read as that user too (so that nothing
they create belongs to root). Unix only; a process with root's capabilities but another
uid is not told apart.
"""

from __future__ import annotations

import os
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path

from mailrelayd.config import Config


class PrivilegeError(Exception):
    """This process may not relay as it is, or cannot become `user` (exit status 78)."""


@dataclass(frozen=True)
class Account:
    """A user to switch to, as the user database has it."""

    name: str
    uid: int
    gid: int
    home: str


def plan(config: Config, read_only: bool = False) -> Account | None:
    """The account to switch to before touching a queue, or None to stay as we are.

    Raises PrivilegeError (its text is the one line to print) when this process may not
    relay as it is: root without `user` or `allow_root`, or another user than `user`."""
    euid = os.geteuid()
    if config.user is None:
        if euid == 0 and not read_only and not config.allow_root:
            raise PrivilegeError("refusing to run as root: set user (--user USER) to the user that relays,"
                                 " or allow_root = true (--allow-root) to relay as root anyway")
        return None
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError:
        raise PrivilegeError(f"user {config.user} does not exist (any more)") from None
    if euid == 0:
        return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    if entry.pw_uid != euid and not read_only:
        raise PrivilegeError(f"user is {entry.pw_name}, but mailrelayd runs as {_name(euid)}: start it as"
                             f" {entry.pw_name}, or as root (it then switches to {entry.pw_name})")
    return None


def switch(account: Account | None) -> None:
    """Become `account` for good: its groups (initgroups), then its group, then its uid;
    HOME, USER and LOGNAME follow (for sendmail and msmtp), as su and systemd's User= set
    them. Raises PrivilegeError if that fails or root could be regained. None: nothing."""
    if account is None:
        return
    code = [d for d in _code_directories() if os.path.isdir(d)]  # seen as root (not a zip file)
    try:
        os.initgroups(account.name, account.gid)
        os.setgid(account.gid)
        os.setuid(account.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot switch to user {account.name}: {e.strerror or e}") from None
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3 or _can_regain_root():
        raise PrivilegeError(f"switched to user {account.name}, but root could be regained: refusing to go on")
    for directory in code:  # Python imports more as it runs (codecs, C modules)
        if not os.access(directory, os.R_OK | os.X_OK):
            raise PrivilegeError(f"user {account.name} cannot read {directory}: install mailrelayd and its Python"
                                 f" where {account.name} can read them (as systemd's User= needs too)")
    os.environ.update(HOME=account.home, USER=account.name, LOGNAME=account.name)


def warn_if_root(log) -> None:
    """Log `running_as_root` at start when relaying as root (which only allow_root permits)."""
    if os.geteuid() == 0:
        log.warning("running_as_root", note="allow_root is set: the relay and its sendmail children run as root;"
                    " set user to relay as an unprivileged user")


def create_log_file(path: Path | None, account: Account | None) -> None:
    """Create the log file `path` (if missing) owned by `account`, so that the reopen after
    logrotate (SIGHUP), which runs as that user, can open it. An existing file, or a
    symlink in its place, is left as it is (O_EXCL)."""
    if account is None or path is None:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError:  # it exists, or cannot be made: opening it for the log says what is wrong
        return
    try:
        os.fchown(fd, account.uid, account.gid)
    finally:
        os.close(fd)


def _code_directories() -> list[str]:
    """Every directory this process has loaded Python code from (and, for a package, the
    directory holding it, where its siblings are looked up)."""
    found = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            found.add(os.path.dirname(path))
            if hasattr(module, "__path__"):
                found.add(os.path.dirname(os.path.dirname(path)))
    return sorted(found)


def _can_regain_root() -> bool:
    for attempt in (os.setuid, os.seteuid):
        try:
            attempt(0)
        except PermissionError:
            continue
        return True
    return False


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
