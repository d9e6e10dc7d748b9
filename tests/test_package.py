"""The Debian package, built from this tree, installed with apt on this machine, used, and purged.

The first tests read the packaging files. The others change the machine (a system user,
/etc files, /var directories), so they run only as root with MAILRELAYD_TEST_INSTALL=1
(tests/install-and-run.sh, which CI runs, sets it). The module builds and installs once;
the last test purges and checks that nothing is left, and the fixture purges in any case,
so a failure leaves the machine as it was. A machine where mailrelayd is already installed
is refused, never purged.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, wait_until
from mta import postfix_instance, smtp_sink  # noqa: F401 (fixtures)
from test_units import verify

import mailrelayd

APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"]
SPOOL = Path("/var/spool/mailrelayd")
# What the package creates besides its own files; all of it must go with a purge.
CREATED_PATHS = [Path("/etc/mailrelayd.toml"), Path("/etc/logrotate.d/mailrelayd"), SPOOL,
                 Path("/var/spool/mailrelayd.mailrelayd"), Path("/var/spool/mailrelayd.mailrelayd.lock"),
                 Path("/var/log/mailrelayd"), Path("/var/lib/mailrelayd"), Path("/usr/bin/mailrelayd"),
                 Path("/usr/bin/mailrelayd-sendmail"), Path("/lib/systemd/system/mailrelayd.service"),
                 Path("/lib/systemd/system/mailrelayd@.service"), Path("/usr/share/doc/mailrelayd"),
                 Path("/usr/share/man/man8/mailrelayd.8.gz"), Path("/usr/share/man/man5/mailrelayd.toml.5.gz"),
                 Path("/usr/share/bash-completion/completions/mailrelayd")]


def run(*command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `command`; on failure, fail the test with its output."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive", **kwargs.pop("env", {})), **kwargs)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def package_state() -> str:
    """dpkg's status of mailrelayd: "installed", "config-files", or "" when not known."""
    proc = run("dpkg-query", "-W", "-f", "${db:Status-Status}", "mailrelayd", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def purge() -> subprocess.CompletedProcess:
    return run("dpkg", "--purge", "mailrelayd")


@pytest.fixture(scope="module")
def deb():
    """The package built by `sh debian/build.sh OUTDIR` and installed by `apt-get install ./DEB`."""
    if os.environ.get("MAILRELAYD_TEST_INSTALL") != "1" or os.geteuid() != 0:
        pytest.skip("installs the Debian package on this machine: run as root with MAILRELAYD_TEST_INSTALL=1"
                    " (sh tests/install-and-run.sh does)")
    if package_state() not in ("", "not-installed"):
        pytest.fail("mailrelayd is already installed here: refusing to replace and then purge it")
    out = Path(tempfile.mkdtemp(prefix="mailrelayd-deb-"))
    try:
        run("sh", str(ROOT / "debian" / "build.sh"), str(out))
        debs = list(out.glob("mailrelayd_*_all.deb"))
        assert len(debs) == 1, f"expected one mailrelayd_VERSION_all.deb, built {os.listdir(out)}"
        run(*APT, "install", f"./{debs[0].name}", cwd=out)
        yield debs[0]
    finally:
        if package_state() not in ("", "not-installed"):
            purge()
        shutil.rmtree(out, ignore_errors=True)


def scratch(owner: str = "mailrelayd") -> Path:
    """A new directory owned by `owner` in a place every user can reach (not pytest's 0700 tmp)."""
    path = Path(tempfile.mkdtemp(prefix="mailrelayd-pkg-"))
    path.chmod(0o755)
    shutil.chown(path, owner, grp.getgrgid(pwd.getpwnam(owner).pw_gid).gr_name)
    return path


def example_queue(owner: str = "mailrelayd") -> Path:
    """A copy of examples/emailqueue.db (four messages Fossil queued), owned by `owner`."""
    directory = scratch(owner)
    queue = directory / "emailqueue.db"
    shutil.copy(ROOT / "examples" / "emailqueue.db", queue)
    shutil.chown(queue, owner, grp.getgrgid(pwd.getpwnam(owner).pw_gid).gr_name)
    return queue


def running(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie."""
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def delivered(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir()) if (maildir / "new").is_dir() else []


# -- the packaging files -----------------------------------------------------------------


def test_debian_dependencies_are_the_floors():
    """debian/control asks for Debian's packages of the libraries at exactly pyproject.toml's floors."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", d).groups() for d in project["dependencies"])
    control = (ROOT / "debian" / "control").read_text()
    depends = re.split(r"\n(?=\S)", control[control.index("\nDepends:") + 1:])[0]
    wanted = dict(re.findall(r"([\w-]+) \(>= ([\w.]+)\)", depends))
    debian_name = {"sqlite-utils": "sqlite-utils"}  # else python3-NAME, without a python- prefix
    assert wanted == {debian_name.get(name, "python3-" + name.removeprefix("python-")): version
                      for name, version in floors.items()}


def test_changelog_names_the_version():
    """debian/changelog's version, which names the .deb, is mailrelayd's own version."""
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"mailrelayd ({mailrelayd.__version__}) ")


def test_example_config_sets_nothing():
    """etc/mailrelayd.toml (the package's /etc/mailrelayd.toml) is all comments: no settings."""
    assert tomllib.loads((ROOT / "etc" / "mailrelayd.toml").read_text()) == {}


def test_example_config_lines_are_valid_settings():
    """Each commented-out `key = value` line of etc/mailrelayd.toml is a valid setting when uncommented."""
    from mailrelayd.config import build

    lines = re.findall(r"(?m)^#(\w+ = .*?)(?:[ \t]+#.*)?$", (ROOT / "etc" / "mailrelayd.toml").read_text())
    assert len(lines) > 20
    for line in lines:
        values = tomllib.loads(line)
        queue = {} if {"db", "spool"} & values.keys() else {"db": "/srv/fossil/emailqueue.db"}
        build({**queue, **values}, {})


# -- the package, installed ------------------------------------------------------------


def test_version_matches_the_source(deb):
    """The deb is named for mailrelayd's version, and the installed command says that version."""
    version = run("/usr/bin/mailrelayd", "--version").stdout.strip()
    assert version == f"mailrelayd {mailrelayd.__version__}"
    assert deb.name == f"mailrelayd_{mailrelayd.__version__}_all.deb"


def test_commands_run_on_debians_python(deb):
    """Both commands are in /usr/bin and run with Debian's python3 and its libraries."""
    for command in ("mailrelayd", "mailrelayd-sendmail"):
        path = Path("/usr/bin") / command
        assert path.read_text().startswith("#!/usr/bin/python3\n") and os.access(path, os.X_OK), command
    code = "import watchdog, structlog; print(watchdog.__file__, structlog.__file__)"
    assert run("/usr/bin/python3", "-c", code).stdout.count("/usr/lib/python3/dist-packages/") == 2


def test_system_user_and_groups(deb):
    """The package makes the system user mailrelayd, in the groups that let it read the spool and run postdrop."""
    user = pwd.getpwnam("mailrelayd")
    assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin"
    assert grp.getgrgid(user.pw_gid).gr_name == "mailrelayd"
    assert "mailrelayd" in grp.getgrnam("mailrelayd-submit").gr_mem
    if shutil.which("postdrop", path="/usr/sbin"):
        assert "mailrelayd" in grp.getgrnam("postdrop").gr_mem


def test_directories(deb):
    """The spool is setgid and sticky for group mailrelayd-submit; state, lock and log belong to mailrelayd."""
    def described(path: str) -> tuple[str, str, str]:
        st = os.stat(path)
        return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, oct(st.st_mode & 0o7777)

    assert described("/var/spool/mailrelayd") == ("mailrelayd", "mailrelayd-submit", "0o3770")
    assert described("/var/spool/mailrelayd.mailrelayd") == ("mailrelayd", "mailrelayd", "0o750")
    assert described("/var/spool/mailrelayd.mailrelayd.lock") == ("mailrelayd", "mailrelayd", "0o644")
    assert described("/var/log/mailrelayd") == ("mailrelayd", "adm", "0o2750")


def test_drains_the_example_queue_as_the_mailrelayd_user(deb):
    """The installed mailrelayd, run as mailrelayd, delivers the example queue's four messages into a Maildir."""
    queue = example_queue()
    maildir = queue.parent / "maildir"
    try:
        run("runuser", "-u", "mailrelayd", "--", "/usr/bin/mailrelayd", "--drain", "--db", str(queue),
            "--maildir", str(maildir))
        assert len(delivered(maildir)) == 4
    finally:
        shutil.rmtree(queue.parent)


def test_default_spool_takes_mail_from_a_submit_group_member(deb):
    """A jailed app's user in mailrelayd-submit queues with mailrelayd-sendmail; mailrelayd relays the default spool."""
    out = scratch()
    try:
        message = "To: bob@example.com\nFrom: trac@example.org\nSubject: from a jail\n\nHello.\n"
        run("setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=mailrelayd-submit",
            "/usr/bin/mailrelayd-sendmail", "-t", input=message)
        run("runuser", "-u", "mailrelayd", "--", "/usr/bin/mailrelayd", "--drain", "--spool", str(SPOOL),
            "--settle", "0", "--maildir", str(out / "maildir"))
        envelope = "Return-Path: <trac@example.org>\nX-Original-To: bob@example.com\nDelivered-To: bob@example.com\n"
        assert [p.read_text() for p in delivered(out / "maildir")] == [envelope + message]
    finally:
        shutil.rmtree(out)


@pytest.mark.mta
def test_relays_through_postfix_with_no_new_privileges(deb, postfix_instance, smtp_sink):
    """As the units run it (user mailrelayd, its groups, no new privileges), the relay sends through Postfix."""
    queue = example_queue()
    try:
        run("setpriv", "--no-new-privs", "--reuid=mailrelayd", "--regid=mailrelayd", "--init-groups",
            "--bounding-set=-all", "/usr/bin/mailrelayd", "--drain", "--db", str(queue),
            env={"MAIL_CONFIG": str(postfix_instance.config_dir)})
        wait_until(lambda: len(smtp_sink.received()) == 4, timeout=60, what="Postfix to relay four messages")
    finally:
        shutil.rmtree(queue.parent)


def test_config_is_a_commented_conffile(deb):
    """/etc/mailrelayd.toml is a conffile, readable by every user, and sets nothing."""
    conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "mailrelayd").stdout
    assert " /etc/mailrelayd.toml " in conffiles and " /etc/logrotate.d/mailrelayd " in conffiles
    assert os.stat("/etc/mailrelayd.toml").st_mode & 0o777 == 0o644
    assert tomllib.loads(Path("/etc/mailrelayd.toml").read_text()) == {}


def test_config_does_not_disturb_other_users(deb):
    """With the package's /etc/mailrelayd.toml in place, another user's `mailrelayd --drain --db X` works."""
    queue = example_queue(owner="nobody")
    try:
        run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/mailrelayd", "--drain",
            "--db", str(queue), "--maildir", str(queue.parent / "maildir"))
        assert len(delivered(queue.parent / "maildir")) == 4
    finally:
        shutil.rmtree(queue.parent)


def test_service_is_not_enabled(deb):
    """Installing does not enable the service: it has no queue until /etc/mailrelayd.toml names one."""
    assert run("systemctl", "is-enabled", "mailrelayd.service", check=False).stdout.strip() == "disabled"


@pytest.mark.parametrize("page", ["mailrelayd", "mailrelayd-sendmail", "mailrelayd.toml"])
def test_installed_manual_pages_render_without_a_warning(deb, page):
    """Each installed manual page renders with man --warnings and no warning."""
    result = subprocess.run(["man", "--warnings", page], capture_output=True, text=True,
                            env={"MANWIDTH": "80", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stderr == "" and "NAME" in result.stdout


def test_bash_completion_is_installed(deb):
    """bash completes mailrelayd's commands from the installed completion file."""
    script = ("source /usr/share/bash-completion/completions/mailrelayd; COMP_WORDS=(mailrelayd sta);"
              " COMP_CWORD=1; _mailrelayd; echo ${COMPREPLY[@]}")
    assert subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout.split() == ["status"]


def test_installed_units_verify(deb, tmp_path):
    """systemd-analyze verify accepts the installed units (the template through an instance)."""
    verify(Path("/lib/systemd/system/mailrelayd.service"))
    instance = tmp_path / "mailrelayd@example.service"
    instance.symlink_to("/lib/systemd/system/mailrelayd@.service")
    verify(instance)


def test_logrotate_reopens_the_log_through_sighup(deb):
    """After logrotate moves the log, the rc.local-style daemon (found by its pidfile) writes a new file."""
    queue = example_queue()
    log = Path("/var/log/mailrelayd/mailrelayd.log")
    pidfile = Path("/run/mailrelayd/mailrelayd.pid")
    pidfile.parent.mkdir(exist_ok=True)
    shutil.chown(pidfile.parent, "mailrelayd", "mailrelayd")
    run("runuser", "-u", "mailrelayd", "--", "/usr/bin/mailrelayd", "--daemon", "--db", str(queue),
        "--maildir", str(queue.parent / "maildir"), "--pidfile", str(pidfile), "--log-file", str(log))

    def detached_pid() -> int | None:  # the pidfile names the parent until the detached child rewrites it
        pid = pidfile.read_text().strip()
        return int(pid) if pid.isdigit() and running(int(pid)) else None

    pid = wait_until(detached_pid, timeout=30, what="the detached daemon's pid")
    try:
        wait_until(lambda: "service_ready" in log.read_text(), timeout=30, what="the daemon to be ready")
        run("logrotate", "--force", "--state", str(queue.parent / "logrotate.state"), "/etc/logrotate.d/mailrelayd")
        assert "service_ready" in Path(f"{log}.1").read_text()
        wait_until(lambda: log.exists() and "config_reloaded" in log.read_text(), timeout=30,
                   what="the daemon to log into a new file")
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not running(pid), timeout=30, what="the daemon to stop")
        shutil.rmtree(pidfile.parent)
        shutil.rmtree(queue.parent)


def test_lintian_finds_no_errors(deb):
    """lintian reports no error about the package (warnings are listed in the output)."""
    proc = run("lintian", "--fail-on", "error", str(deb), check=False)
    print(proc.stdout)
    assert proc.returncode == 0 and not re.search(r"(?m)^E: ", proc.stdout), proc.stdout + proc.stderr


def test_purge_removes_everything_it_created(deb):
    """dpkg --purge removes the files, directories (spool and logs included), user and groups it created."""
    purge()
    assert package_state() in ("", "not-installed")
    assert [p for p in CREATED_PATHS if os.path.lexists(p)] == []
    for getent in (["passwd", "mailrelayd"], ["group", "mailrelayd"], ["group", "mailrelayd-submit"]):
        assert run("getent", *getent, check=False).returncode == 2, getent
