"""The sendmail-compatible injector: real processes writing into a real spool directory."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from watchdog.events import FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from mailrelayd import inject
from mailrelayd.inject import ENVELOPE_MAGIC, format_envelope, split_envelope
from conftest import ROOT, fossil_message, wait_until

INJECT = ROOT / "mailrelayd" / "inject.py"
NAME = re.compile(r"\d{14}\d{4}\d{6}\.email")
MESSAGE = b"Subject: hello\nFrom: Trac <trac@example.org>\n\nLine one.\n.\nLast line, no newline"


def run(*args: str, stdin: bytes = MESSAGE, spool: Path | None = None, env: dict | None = None,
        command: list[str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the injector as a separate process (by default `python -m mailrelayd.inject`)."""
    environment = {k: v for k, v in os.environ.items() if k != "MAILRELAYD_SPOOL"}
    environment["PYTHONPATH"] = str(ROOT)
    environment.update(env or {})
    spool_args = ["--spool", str(spool)] if spool is not None else []
    command = command or [sys.executable, "-m", "mailrelayd.inject"]
    return subprocess.run([*command, *spool_args, *args], input=stdin, capture_output=True,
                          env=environment, timeout=60, **kwargs)


def spool_files(spool: Path) -> list[Path]:
    return sorted(spool.iterdir())


def only_file(spool: Path) -> bytes:
    files = spool_files(spool)
    assert len(files) == 1 and NAME.fullmatch(files[0].name), files
    return files[0].read_bytes()


def assert_usage_error(result: subprocess.CompletedProcess, spool: Path) -> None:
    assert result.returncode == 64
    assert result.stdout == b"" and len(result.stderr.splitlines()) == 1, result.stderr
    assert spool_files(spool) == []


@pytest.fixture
def spool(tmp_path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


def test_trac_command_line_queues_one_silent_file(spool):
    """Trac's `-i -f FROM RCPT...` exits 0 with no output and stores preamble plus exact bytes."""
    result = run("-i", "-f", "trac@example.org", "a@x.org", "b@x.org", spool=spool)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert only_file(spool) == (b"MAILRELAYD-ENVELOPE 1\nsender trac@example.org\n"
                                b"recipient a@x.org\nrecipient b@x.org\n\n" + MESSAGE)


def test_message_bytes_are_kept_exactly(spool):
    """CRLF, a lone dot line, NUL and non-UTF-8 bytes reach the spool unchanged."""
    message = fossil_message(body="caf\xe9\r\n.\r\n") + b"\xff\xfe\x00raw\r\n"
    assert run("-oi", "a@x.org", stdin=message, spool=spool).returncode == 0
    assert split_envelope(only_file(spool)) == ("", ("a@x.org",), message)


def test_header_recipients_are_added_to_argument_recipients(spool):
    """-t takes To:, Cc: and Bcc: addresses after the argument ones, without duplicates."""
    message = b"To: A <a@x.org>, b@x.org\nCc: c@x.org\nBcc: d@x.org\nSubject: s\n\nbody\n"
    assert run("-t", "-f", "s@x.org", "z@x.org", "a@x.org", stdin=message, spool=spool).returncode == 0
    assert split_envelope(only_file(spool))[1] == ("z@x.org", "a@x.org", "b@x.org", "c@x.org", "d@x.org")


def test_bcc_is_removed_with_lf_line_ends(spool):
    """-t drops the Bcc: field, and only it, from an LF message."""
    message = b"To: a@x.org\nBcc: d@x.org\nSubject: s\n\nbody\n"
    assert run("-t", stdin=message, spool=spool).returncode == 0
    assert split_envelope(only_file(spool))[2] == b"To: a@x.org\nSubject: s\n\nbody\n"


def test_folded_bcc_is_removed_with_crlf_line_ends(spool):
    """-t drops every Bcc: field with its continuation lines and keeps CRLF elsewhere."""
    message = (b"To: a@x.org\r\nBCC: d@x.org,\r\n\te@x.org\r\nSubject: s\r\n"
               b"bcc : f@x.org\r\nX-Other: 1\r\n\r\nbody\r\n")
    assert run("-ti", stdin=message, spool=spool).returncode == 0
    _, recipients, stored = split_envelope(only_file(spool))
    assert stored == b"To: a@x.org\r\nSubject: s\r\nX-Other: 1\r\n\r\nbody\r\n"
    assert recipients == ("a@x.org", "d@x.org", "e@x.org", "f@x.org")


def test_bcc_lines_in_the_body_are_kept(spool):
    """Only the header block loses Bcc:; a body line that looks like one is message text."""
    message = b"To: a@x.org\n\nBcc: not-a-header@x.org\n"
    assert run("-t", stdin=message, spool=spool).returncode == 0
    _, recipients, stored = split_envelope(only_file(spool))
    assert (recipients, stored) == (("a@x.org",), message)


def test_bcc_is_kept_without_t(spool):
    """Without -t the message is stored exactly as read, Bcc: included."""
    message = b"To: a@x.org\nBcc: d@x.org\n\nbody\n"
    assert run("a@x.org", stdin=message, spool=spool).returncode == 0
    assert split_envelope(only_file(spool)) == ("", ("a@x.org",), message)


def test_no_recipient_anywhere_is_a_usage_error(spool):
    """-t with no argument recipients and no To:/Cc:/Bcc: exits 64 and queues nothing."""
    assert_usage_error(run("-t", "-f", "s@x.org", stdin=b"Subject: s\n\nbody\n", spool=spool), spool)


def test_no_recipient_argument_is_a_usage_error(spool):
    """Without -t, recipients must be given as arguments, even if the header has some."""
    assert_usage_error(run("-i", stdin=b"To: a@x.org\n\nbody\n", spool=spool), spool)


@pytest.mark.parametrize("recipient", [
    "-oQ/tmp/evil", "a b@x.org", "a@x.org,b@x.org", "<a@x.org>", "a@x.org\n", "a\x01@x.org",
    "a@b@x.org", "a;b@x.org", '"a"@x.org', "(c)a@x.org", "a@x:org", "@x.org", "a@", "",
])
def test_unsafe_recipient_is_refused(spool, recipient):
    """An argument that is not a plain address exits 64 with one line, nothing queued."""
    assert_usage_error(run("-i", "--", recipient, spool=spool), spool)


def test_unsafe_header_recipient_is_refused(spool):
    """With -t, a To: address that is not plain is refused like an argument would be."""
    assert_usage_error(run("-t", stdin=b'To: "a b"@x.org\n\nbody\n', spool=spool), spool)


@pytest.mark.parametrize("recipient", ["root", "a@[192.0.2.1]", "a@[IPv6:2001:db8::1]", "j\xf6rg@x.org"])
def test_plain_recipient_forms_are_accepted(spool, recipient):
    """A bare local name, a domain literal and a UTF-8 address are plain addresses."""
    assert run("-i", recipient, spool=spool).returncode == 0
    assert split_envelope(only_file(spool))[1] == (recipient,)


@pytest.mark.parametrize("sender", ["-oQ/tmp/x", "a b@x.org", "<a@x.org>"])
def test_unsafe_sender_is_refused(spool, sender):
    """-f with anything but a plain address (or the null sender) exits 64."""
    assert_usage_error(run("-f", sender, "a@x.org", spool=spool), spool)


@pytest.mark.parametrize("args", [["-f", ""], ["-f", "<>"], ["-r", "<>"], []])
def test_null_sender_is_stored_empty(spool, args):
    """-f '', -f '<>' and no -f at all give an empty sender line."""
    assert run(*args, "a@x.org", spool=spool).returncode == 0
    assert only_file(spool).startswith(b"MAILRELAYD-ENVELOPE 1\nsender \nrecipient a@x.org\n\n")


@pytest.mark.parametrize("args", [["-fs@x.org"], ["-r", "s@x.org"], ["-rs@x.org"], ["-itfs@x.org"]])
def test_sender_option_forms(spool, args):
    """-f and -r take the sender attached or as the next argument, also inside a cluster."""
    assert run(*args, "a@x.org", spool=spool).returncode == 0
    assert split_envelope(only_file(spool))[0] == "s@x.org"


def test_full_name_adds_from_when_missing(spool):
    """-F NAME with -f adds `From: NAME <ADDR>` in the message's line-end style."""
    message = b"To: a@x.org\r\nSubject: s\r\n\r\nbody"
    assert run("-F", "Jo Q. Public", "-f", "jo@x.org", "a@x.org", stdin=message, spool=spool).returncode == 0
    assert split_envelope(only_file(spool))[2] == b'From: "Jo Q. Public" <jo@x.org>\r\n' + message


def test_full_name_never_replaces_from(spool):
    """A message that has a From: is stored unchanged whatever -F says."""
    assert run("-FOther", "-f", "jo@x.org", "a@x.org", spool=spool).returncode == 0
    assert split_envelope(only_file(spool))[2] == MESSAGE


def test_unknown_option_is_a_usage_error(spool):
    """An option sendmail-compatible programs do not use exits 64 with one stderr line."""
    result = run("-Z", "a@x.org", spool=spool)
    assert_usage_error(result, spool)
    assert b"-Z" in result.stderr


@pytest.mark.parametrize("mode", ["-bs", "-bp", "-bd", "-bi", "-bv", "--verbose"])
def test_other_modes_are_usage_errors(spool, mode):
    """Only delivery mode (-bm) exists here; SMTP, queue listing and the like exit 64."""
    assert_usage_error(run(mode, "a@x.org", spool=spool), spool)


def test_missing_option_argument_is_a_usage_error(spool):
    """-f as the last argument has no sender to take."""
    assert_usage_error(run("-f", spool=spool), spool)


def test_common_flags_are_ignored(spool):
    """-oem -odb -v and the other common flags (with their arguments) change nothing."""
    args = ["-oem", "-odb", "-v", "-odi", "-oi", "-i", "-bm", "-em", "-ep", "-eq", "-U", "-G",
            "-N", "never", "-B", "8BITMIME", "-R", "hdrs", "-V", "envid", "-X", "/tmp/log",
            "-L", "tag", "-O", "DeliveryMode=b", "-Nsuccess", "-o", "i"]
    assert run(*args, "a@x.org", spool=spool).returncode == 0
    assert split_envelope(only_file(spool)) == ("", ("a@x.org",), MESSAGE)


def test_too_large_message_is_refused(spool):
    """A message over MAX_MESSAGE_SIZE exits 64 with "message too large", nothing queued."""
    result = run("a@x.org", stdin=b"x" * (inject.MAX_MESSAGE_SIZE + 1), spool=spool)
    assert_usage_error(result, spool)
    assert b"message too large" in result.stderr


def test_missing_spool_is_a_temporary_failure(tmp_path):
    """A spool directory that does not exist exits 75 and creates nothing."""
    result = run("a@x.org", spool=tmp_path / "nowhere")
    assert result.returncode == 75 and result.stdout == b"" and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_spool_that_is_a_file_is_a_temporary_failure(tmp_path):
    """A spool path naming a regular file exits 75 and leaves the file alone."""
    (tmp_path / "spool").write_bytes(b"not a directory")
    assert run("a@x.org", spool=tmp_path / "spool").returncode == 75
    assert [p.name for p in tmp_path.iterdir()] == ["spool"]
    assert (tmp_path / "spool").read_bytes() == b"not a directory"


@pytest.fixture
def public_dir():
    """A directory any user may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mailrelayd-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _python_for(as_user: dict) -> str:
    """An interpreter that user may run (root's pyenv is often private), or skip."""
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            if subprocess.run([python, "-c", "pass"], capture_output=True, **as_user).returncode == 0:
                return python
        except OSError:
            continue
    pytest.skip("no Python interpreter that nobody may run")


def test_unwritable_spool_is_a_temporary_failure(public_dir):
    """A spool the user may not write to exits 75 with one line (run as nobody when root)."""
    spool = public_dir / "spool"
    spool.mkdir(mode=0o755)
    python, as_user = sys.executable, {}
    if os.geteuid() == 0:
        as_user = {"user": 65534, "group": 65534, "extra_groups": [], "cwd": "/"}
        python = _python_for(as_user)
    else:
        spool.chmod(0o555)
    command = [python, "-I", "-c", INJECT.read_text()]  # nobody may not read ROOT
    result = run("a@x.org", spool=spool, command=command, **as_user)
    assert result.returncode == 75 and len(result.stderr.splitlines()) == 1, result.stderr
    assert b"Permission denied" in result.stderr
    assert spool_files(spool) == []


def _small_file_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_write_failure_leaves_no_temporary_file(spool):
    """A write that fails halfway (file size limit) exits 75 and removes the temporary file."""
    result = run("a@x.org", stdin=b"Subject: big\n\n" + b"x" * 100_000, spool=spool,
                 preexec_fn=_small_file_limit)
    assert result.returncode == 75 and len(result.stderr.splitlines()) == 1, result.stderr
    assert spool_files(spool) == []


def test_no_temporary_file_remains_after_success(spool):
    """After a successful run the spool holds the .email file and nothing else."""
    for _ in range(3):
        assert run("a@x.org", spool=spool).returncode == 0
    assert [p.name for p in spool_files(spool) if not NAME.fullmatch(p.name)] == []
    assert len(spool_files(spool)) == 3


def test_spool_comes_from_environment(spool):
    """Without --spool, MAILRELAYD_SPOOL names the spool directory."""
    assert run("a@x.org", env={"MAILRELAYD_SPOOL": str(spool)}).returncode == 0
    only_file(spool)


def test_spool_option_beats_environment(spool, tmp_path):
    """--spool DIR wins over MAILRELAYD_SPOOL."""
    other = tmp_path / "other"
    other.mkdir()
    assert run("a@x.org", spool=spool, env={"MAILRELAYD_SPOOL": str(other)}).returncode == 0
    only_file(spool)
    assert list(other.iterdir()) == []


def test_spool_option_with_equals(spool):
    """--spool=DIR is the same as --spool DIR."""
    assert run(f"--spool={spool}", "a@x.org").returncode == 0
    only_file(spool)


@pytest.mark.skipif(os.path.exists(inject.DEFAULT_SPOOL), reason="default spool exists on this machine")
def test_default_spool_is_var_spool_mailrelayd():
    """With neither --spool nor MAILRELAYD_SPOOL, the spool is /var/spool/mailrelayd."""
    result = run("a@x.org")
    assert result.returncode == 75 and b"/var/spool/mailrelayd" in result.stderr


class _Recorder(FileSystemEventHandler):
    def __init__(self):
        self.events = []

    def on_any_event(self, event):
        if not event.is_directory:  # the spool's own "modified" events say nothing about files
                self.events.append((event.event_type, os.path.basename(event.src_path),
                                os.path.basename(getattr(event, "dest_path", "") or "")))


def test_final_name_appears_only_by_rename(spool, tmp_path):
    """inotify sees the .email name only as a rename target: never created or written in place."""
    recorder, observer = _Recorder(), InotifyObserver()
    observer.schedule(recorder, str(spool))
    observer.start()
    try:
        assert run("a@x.org", stdin=MESSAGE * 2000, spool=spool).returncode == 0
        (spool / ".sentinel").write_bytes(b"")
        wait_until(lambda: any(src == ".sentinel" for _, src, _ in recorder.events), what="inotify events")
    finally:
        observer.stop()
        observer.join()
    [final] = [p.name for p in spool.glob("*.email")]
    touching_final = [e for e in recorder.events if final in e[1:]]
    assert touching_final and all(kind == "moved" and dest == final for kind, _, dest in touching_final)
    assert all(src.startswith(".") for _, src, _ in recorder.events)


def test_parallel_injections_never_share_a_name(spool):
    """200 concurrent runs (many in the same second) leave 200 distinct, intact files."""
    environment = {**os.environ, "MAILRELAYD_SPOOL": str(spool)}
    processes = []
    for n in range(200):
        process = subprocess.Popen([sys.executable, "-I", str(INJECT), f"r{n}@x.org"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=environment)
        processes.append(process)
    for n, process in enumerate(processes):
        assert process.communicate(b"Subject: %d\n\nbody %d\n" % (n, n), timeout=120) == (b"", b"")
        assert process.returncode == 0
    files = spool_files(spool)
    assert len(files) == 200 and all(NAME.fullmatch(p.name) for p in files)
    seen = {split_envelope(p.read_bytes())[1] for p in files}
    assert seen == {(f"r{n}@x.org",) for n in range(200)}
    assert max(Counter(p.name[:14] for p in files).values()) > 1  # some shared a second


@pytest.mark.parametrize("move", [inject.rename_noreplace, inject.link_noreplace])
def test_publishing_never_overwrites(tmp_path, move):
    """When the chosen name exists, a new name is drawn; the existing file is untouched."""
    (tmp_path / "taken.email").write_bytes(b"someone else's message")
    (tmp_path / ".tmp").write_bytes(b"ours")
    names = iter(["taken.email", "taken.email", "free.email"])
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert inject.publish(".tmp", dir_fd, new_name=lambda: next(names), move=move) == "free.email"
    finally:
        os.close(dir_fd)
    assert (tmp_path / "taken.email").read_bytes() == b"someone else's message"
    assert (tmp_path / "free.email").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free.email", "taken.email"]


def test_stored_file_is_mode_0640_whatever_the_umask(spool):
    """The file is owner read-write, group read, even under umask 077 or 000."""
    for umask in (0o077, 0o000):
        result = run("a@x.org", spool=spool, preexec_fn=lambda: os.umask(umask))
        assert result.returncode == 0
    assert {p.stat().st_mode & 0o777 for p in spool_files(spool)} == {0o640}


def test_split_envelope_ignores_plain_messages():
    """A Fossil message (no preamble) is not an envelope file: None."""
    assert split_envelope(fossil_message()) is None


@pytest.mark.parametrize("data, reason", [
    (b"MAILRELAYD-ENVELOPE 2\nsender \nrecipient a@x.org\n\nm", "unknown envelope version"),
    (b"MAILRELAYD-ENVELOPE 1\nsender \nrecipient a@x.org\n", "no blank line"),
    (b"MAILRELAYD-ENVELOPE 1\nsender s@x.org\n\nm", "no recipient"),
    (b"MAILRELAYD-ENVELOPE 1\nrecipient a@x.org\n\nm", "unexpected envelope line"),
    (b"MAILRELAYD-ENVELOPE 1\nsender \nrecipient -oQ/tmp@x\n\nm", "bad recipient"),
    (b"MAILRELAYD-ENVELOPE 1\nsender a b\nrecipient a@x.org\n\nm", "bad sender"),
    (b"MAILRELAYD-ENVELOPE 1\nsender \nrecipient a@x.org\r\n\r\nm", "bad recipient"),
    (b"MAILRELAYD-ENVELOPE 1\nsender \nrecipient a@x.org\nX-Other: 1\n\nm", "unexpected envelope line"),
    (b"MAILRELAYD-ENVELOPE 1\nsender \nsender \nrecipient a@x.org\n\nm", "unexpected envelope line"),
    (b"MAILRELAYD-ENVELOPE 1\nsender \nrecipient \xff@x.org\n\nm", "not UTF-8"),
])
def test_split_envelope_refuses_malformed_preambles(data, reason):
    """A file that starts like an envelope but is not exactly one raises ValueError with why."""
    with pytest.raises(ValueError, match=reason):
        split_envelope(data)


_local = st.text(alphabet="abcxyz0123456789.+_=-", min_size=1, max_size=20).filter(
    lambda s: s[0] not in "-." and s[-1] != "." and ".." not in s)  # a dot-atom
_address = st.builds(lambda l, d: f"{l}@{d}", _local, st.sampled_from(["x.org", "[192.0.2.1]", "ex-ample.com"]))


@given(sender=st.one_of(st.just(""), _address), recipients=st.lists(_address, min_size=1, max_size=5),
       message=st.binary(max_size=300))
def test_split_envelope_round_trips_format_envelope(sender, recipients, message):
    """Whatever format_envelope writes before any message bytes, split_envelope gives back."""
    data = format_envelope(sender, recipients) + message
    assert data.startswith(ENVELOPE_MAGIC)
    assert split_envelope(data) == (sender, tuple(recipients), message)


def test_copied_file_runs_alone_in_isolated_mode(tmp_path, spool):
    """inject.py copied alone into an empty directory works under `python3 -I -S`."""
    jail = tmp_path / "jail"
    jail.mkdir()
    shutil.copy(INJECT, jail / "inject.py")
    isolated = [sys.executable, "-I", "-S"]
    probe = subprocess.run([*isolated, "-c", "import mailrelayd"], cwd=jail, capture_output=True)
    assert probe.returncode != 0  # mailrelayd (and site-packages) really are out of reach
    result = run("-i", "-f", "trac@example.org", "a@x.org", spool=spool, cwd=jail,
                 command=[*isolated, str(jail / "inject.py")], env={"PYTHONPATH": ""})
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert split_envelope(only_file(spool)) == ("trac@example.org", ("a@x.org",), MESSAGE)


def test_copied_file_runs_as_a_command(tmp_path, spool):
    """inject.py installed alone with mode 0755 is a command Trac's sendmail_path can name."""
    command = tmp_path / "mailrelayd-sendmail"
    shutil.copy(INJECT, command)
    command.chmod(0o755)
    result = run("-i", "-f", "trac@example.org", "a@x.org", spool=spool, command=[str(command)])
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert split_envelope(only_file(spool))[1] == ("a@x.org",)


def readme_block(heading: str) -> str:
    """The first ```sh block of README.md under `heading`."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(f"\n{heading}\n"):]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def test_readme_recipe_copies_the_injector_from_an_installed_mailrelayd(tmp_path, spool):
    """The README's recipe, run where mailrelayd is pip-installed in a venv and only its command is on PATH (no checkout, no venv python), copies a working injector into the jail."""
    source = tmp_path / "source"  # what `pip install .` is given; the checkout is left untouched
    shutil.copytree(ROOT / "mailrelayd", source / "mailrelayd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                                "-q", "--no-deps", str(source)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    jail_bin = tmp_path / "jail" / "usr" / "local" / "bin"
    jail_bin.mkdir(parents=True)
    (tmp_path / "bin").mkdir()  # as /usr/local/bin/mailrelayd -> /opt/mailrelayd/bin/mailrelayd
    (tmp_path / "bin" / "mailrelayd").symlink_to(venv / "bin" / "mailrelayd")
    recipe = readme_block("### Copying it into a jail").replace("/jail/", f"{tmp_path / 'jail'}/")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}  # no venv, PYTHONPATH or checkout

    copied = subprocess.run(["sh", "-euc", recipe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert copied.returncode == 0, copied.stderr
    command = jail_bin / "mailrelayd-sendmail"
    assert command.read_bytes() == INJECT.read_bytes() and os.access(command, os.X_OK)
    result = run("-i", "-f", "trac@example.org", "a@x.org", spool=spool, command=[str(command)], cwd=tmp_path,
                 env={"PYTHONPATH": ""})
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert split_envelope(only_file(spool)) == ("trac@example.org", ("a@x.org",), MESSAGE)
