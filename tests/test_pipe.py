"""The sendmail pipe transport, against a real executable."""

import os
import shutil
import stat

import pytest

from mailrelayd.message import read_envelope, to_lf
from mailrelayd.outcome import PermanentFailure, Sent, TemporaryFailure
from mailrelayd.transports.pipe import PipeTransport
from conftest import UTF8_ENCODED, fossil_message, utf8_message, wait_until
from mta import POSTFIX_SENDMAIL, postfix_instance, smtp_sink  # noqa: F401  (fixtures are used by name)

PERMANENT = frozenset({65, 67})


def deliver(fake_sendmail, data=None, timeout=10.0, command=None, encode_utf8=True):
    data = data if data is not None else fossil_message()
    transport = PipeTransport(command or (str(fake_sendmail.path), "-ti"), timeout, PERMANENT, encode_utf8)
    return transport.deliver(data, read_envelope(data))


def test_exit_zero_is_sent(fake_sendmail):
    """Status 0 means the mail system took the message."""
    assert isinstance(deliver(fake_sendmail), Sent)


def test_argv_has_command_then_envelope_sender(fake_sendmail):
    """The command runs as given, with -f and the header's sender appended."""
    deliver(fake_sendmail, fossil_message(sender="proj@example.org"))
    assert fake_sendmail.calls()[0][0] == ["-ti", "-f", "proj@example.org"]


def test_stdin_gets_lf_line_endings_and_keeps_dot_lines(fake_sendmail):
    """Mixed CRLF/LF become LF; a lone '.' line is passed through untouched."""
    data = b"To: a@x.org\nSubject: s\r\n\r\nline\r\n.\r\nafter\n"
    deliver(fake_sendmail, data)
    assert fake_sendmail.bodies() == [b"To: a@x.org\nSubject: s\n\nline\n.\nafter\n"]


def test_invalid_utf8_and_nul_bytes_pass_byte_for_byte(fake_sendmail):
    """The body is bytes, never decoded: invalid UTF-8 and NUL arrive unchanged."""
    data = b"To: a@x.org\n\n\xff\xfe\x00caf\xe9\n"
    assert isinstance(deliver(fake_sendmail, data), Sent)
    assert fake_sendmail.bodies() == [data]


def test_header_text_that_is_not_ascii_reaches_the_command_as_encoded_words(fake_sendmail):
    """By default the Subject and display names reach sendmail as encoded-words; the addresses, the
    envelope, every ASCII field and the body are untouched."""
    assert isinstance(deliver(fake_sendmail, utf8_message()), Sent)
    assert fake_sendmail.bodies() == [to_lf(UTF8_ENCODED)]
    assert fake_sendmail.calls()[0][0] == ["-ti", "-f", "noreply@example.org"]


def test_keep_passes_header_text_that_is_not_ascii_as_it_is(fake_sendmail):
    """With utf8_headers = keep the command gets the header's bytes as they were queued."""
    deliver(fake_sendmail, utf8_message(), encode_utf8=False)
    assert fake_sendmail.bodies() == [to_lf(utf8_message())]


def test_tempfail_status_is_temporary(fake_sendmail):
    """75 (EX_TEMPFAIL) keeps the message for a retry, with the program's last words."""
    fake_sendmail.exit_with(75, "queue file write error")
    outcome = deliver(fake_sendmail)
    assert isinstance(outcome, TemporaryFailure)
    assert "75 (EX_TEMPFAIL): queue file write error" in outcome.detail


def test_configured_permanent_status_is_permanent(fake_sendmail):
    """A status listed in permanent_exit_codes (65, msmtp's 5xx) sets the message aside."""
    fake_sendmail.exit_with(65)
    assert isinstance(deliver(fake_sendmail), PermanentFailure)


def test_unlisted_status_is_temporary(fake_sendmail):
    """69 (msmtp's answer to a 4xx) proves nothing about the message: retry."""
    fake_sendmail.exit_with(69)
    assert isinstance(deliver(fake_sendmail), TemporaryFailure)


def test_missing_program_is_a_setup_error_not_a_loss(fake_sendmail, tmp_path):
    """A command that does not exist defers the message and is flagged as our set-up's fault."""
    outcome = deliver(fake_sendmail, command=(str(tmp_path / "no-such-sendmail"), "-ti"))
    assert isinstance(outcome, TemporaryFailure) and outcome.setup_error
    assert "cannot run" in outcome.detail


def test_non_executable_program_is_a_setup_error(fake_sendmail):
    """A command without execute permission defers the message."""
    os.chmod(fake_sendmail.path, stat.S_IRUSR)
    outcome = deliver(fake_sendmail)
    assert isinstance(outcome, TemporaryFailure) and outcome.setup_error


def test_timeout_kills_the_whole_process_group(fake_sendmail):
    """A delivery over its timeout is killed, with its children, and deferred."""
    fake_sendmail.take_seconds(37.25)
    outcome = deliver(fake_sendmail, timeout=1)
    assert isinstance(outcome, TemporaryFailure) and "timed out after 1 s" in outcome.detail
    wait_until(lambda: not processes_running(b"sleep\x0037.25\x00"), timeout=5, what="the child to die")


@pytest.mark.mta
def test_timeout_reason_keeps_what_postfix_said(fake_sendmail, postfix_instance):
    """Postfix's sendmail under NoNewPrivileges (postdrop loses its setgid) waits out the timeout, and the reason keeps postdrop's "Permission denied"."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed (apt-get install util-linux)")
    # As systemd's NoNewPrivileges=yes does; root also gives up overriding file permissions.
    command = ("setpriv", "--no-new-privs", "--bounding-set=-dac_override,-dac_read_search",
               POSTFIX_SENDMAIL, "-C", str(postfix_instance.config_dir), "-ti")
    outcome = deliver(fake_sendmail, timeout=3, command=command)
    assert isinstance(outcome, TemporaryFailure)
    assert "timed out after 3 s and was killed: " in outcome.detail
    assert "postdrop: warning: mail_queue_enter: create file maildrop/" in outcome.detail
    assert "Permission denied" in outcome.detail


def processes_running(cmdline: bytes) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == cmdline:
                    found.append(pid)
        except OSError:
            pass
    return found


def test_large_message_is_delivered_whole(fake_sendmail):
    """A 50 MB message goes through the pipe complete."""
    data = b"To: a@x.org\n\n" + b"x" * 79 + b"\n"
    data = data + b"y" * (50 * 1024 * 1024)
    assert isinstance(deliver(fake_sendmail, data, timeout=60), Sent)
    assert len(fake_sendmail.bodies()[0]) == len(data)


def test_failure_detail_keeps_the_last_lines_of_output(fake_sendmail):
    """The reason keeps the server's reply that msmtp prints before its closing line."""
    fake_sendmail.exit_with(65, "msmtp: server message: 550 5.1.1 No such user\nmsmtp: could not send mail\n")
    detail = deliver(fake_sendmail).detail
    assert "550 5.1.1 No such user | msmtp: could not send mail" in detail


def test_explicit_recipients_are_arguments_and_t_is_dropped(fake_sendmail):
    """With recipients given beside the message, -t goes and they are passed as arguments."""
    from mailrelayd.message import explicit_envelope

    data = b"To: public@x.org\nBcc: never-from-header@x.org\n\nbody"
    transport = PipeTransport((str(fake_sendmail.path), "-ti"), 10, PERMANENT)
    transport.deliver(data, explicit_envelope(data, "trac@x.org", ("a@x.org", "hidden@x.org")))
    assert fake_sendmail.calls()[0][0] == ["-i", "-f", "trac@x.org", "a@x.org", "hidden@x.org"]
