"""`list`, `show` and `retry` tell what was used and what happened (issue 10, items 9 and 10).

The messages are relayed by real drains (`mailrelayd --drain`) through the fake sendmail,
which records the `-f` it was given; the admin commands then run in process.
"""

import json

import pytest
from conftest import fossil_message, run_cli
from test_admin import admin, ids  # noqa: F401  (admin is a fixture)

DRAIN_SAYS_NO = 75


def drain(harness, sendmail, status: int, *extra: str) -> None:
    """One drain pass over the harness's queue with the fake sendmail exiting `status`."""
    sendmail.exit_with(status, say="sendmail says no" if status else "")
    result = run_cli("--drain", *harness.cli_args, "--settle", "0", "--command", f"{sendmail.path} -ti", *extra)
    assert result.returncode == status, result.stderr


def sent_with(sendmail) -> str | None:
    """The -f the last sendmail run was given, or None."""
    argv = sendmail.calls()[-1][0]
    return argv[argv.index("-f") + 1] if "-f" in argv else None


def history(output: str) -> dict[str, str]:
    """show's history lines (after the header), by key."""
    lines = output.split("\n\n", 1)[1].splitlines()
    return {key.rstrip(":"): value.strip() for key, _, value in (line.partition(" ") for line in lines)}


@pytest.mark.parametrize("setting", [[], ["--envelope-from", "bounces@example.net"]], ids=["header", "fixed"])
def test_show_and_list_name_the_sender_a_delivery_used(queue_harness, fake_sendmail, admin, setting):
    """show and list --json give as the envelope sender the very -f the delivery was given: the message's own, or
    the configured envelope_from."""
    queue_harness.enqueue(fossil_message(sender="alerts@example.org"))
    drain(queue_harness, fake_sendmail, DRAIN_SAYS_NO, *setting)
    used = sent_with(fake_sendmail)
    assert used == (setting[1] if setting else "alerts@example.org")
    [ident] = ids(admin(queue_harness, "list"))
    assert history(admin(queue_harness, "show", ident, *setting).stdout)["envelope_from"] == used
    [listed] = admin(queue_harness, "list", "--json", *setting).stdout.splitlines()
    assert json.loads(listed)["sender"] == used


def test_injected_message_without_f_shows_the_header_sender_it_is_sent_with(spool_harness, fake_sendmail, admin):
    """A message from mailrelayd-sendmail without -f goes out with its From: as -f, and show and list say so (not
    `<>`)."""
    injected = run_cli("enqueue", "--spool", str(spool_harness.path), "-t",
                       input="From: Trac <trac@example.org>\nTo: bob@example.com\nSubject: x\n\nbody\n")
    assert injected.returncode == 0, injected.stderr
    drain(spool_harness, fake_sendmail, DRAIN_SAYS_NO)
    assert sent_with(fake_sendmail) == "trac@example.org"
    [ident] = ids(admin(spool_harness, "list"))
    assert history(admin(spool_harness, "show", ident).stdout)["envelope_from"] == "trac@example.org"
    assert " trac@example.org " in admin(spool_harness, "list").stdout.splitlines()[1]


def test_envelope_from_none_is_shown_as_no_sender_passed_on(queue_harness, fake_sendmail, admin):
    """With envelope_from = none, sendmail gets no -f, and show says no sender is passed on."""
    queue_harness.enqueue(fossil_message())
    drain(queue_harness, fake_sendmail, DRAIN_SAYS_NO, "--envelope-from", "none")
    assert sent_with(fake_sendmail) is None
    [ident] = ids(admin(queue_harness, "list"))
    shown = history(admin(queue_harness, "show", ident, "--envelope-from", "none").stdout)["envelope_from"]
    assert shown.startswith("none passed on")


def test_failed_message_shows_when_its_last_try_was(queue_harness, fake_sendmail, admin):
    """A message set aside at its first try shows attempts 1 and that try's time as last_try, the time it failed."""
    queue_harness.enqueue(fossil_message())
    drain(queue_harness, fake_sendmail, 65)
    [ident] = ids(admin(queue_harness, "list", "--failed"))
    shown = history(admin(queue_harness, "show", ident).stdout)
    assert shown["attempts"] == "1"
    assert shown["last_try"] != "-" and shown["last_try"] == shown["failed_at"]
    [listed] = admin(queue_harness, "list", "--failed", "--json").stdout.splitlines()
    entry = json.loads(listed)
    assert entry["last_try"] is not None and entry["last_try"] == entry["failed_at"]


def test_show_names_smtp_from_over_smtp(queue_harness, admin, tmp_path):
    """With an SMTP server and smtp_from in the configuration, show gives smtp_from (the MAIL FROM used) as the
    envelope sender, not the message's own."""
    config = tmp_path / "mailrelayd.toml"
    config.write_text('smtp_server = "127.0.0.1"\nsmtp_from = "relay@example.net"\n')
    queue_harness.enqueue(fossil_message(sender="alerts@example.org"))
    [ident] = ids(admin(queue_harness, "list"))
    assert history(admin(queue_harness, "show", ident, "--config", str(config)).stdout)["envelope_from"] == \
        "relay@example.net"


def test_retry_of_a_message_already_due_is_success(queue_harness, admin):
    """retry ID of a message that is due already (queued, never tried) says so and exits 0."""
    queue_harness.enqueue(fossil_message())
    [ident] = ids(admin(queue_harness, "list"))
    result = admin(queue_harness, "retry", ident)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{ident}: already due\n", "")


def test_retry_of_a_failed_message_without_failed_exits_1(queue_harness, fake_sendmail, admin):
    """retry ID (without --failed) of a failed message is not "already due": it says there is no such deferred
    message and exits 1."""
    queue_harness.enqueue(fossil_message())
    drain(queue_harness, fake_sendmail, 65)
    [ident] = ids(admin(queue_harness, "list", "--failed"))
    result = admin(queue_harness, "retry", ident)
    assert result.returncode == 1 and f"no deferred message {ident}" in result.stderr
