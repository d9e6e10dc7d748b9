"""Many queues in one config: [[queue]] tables, per-queue settings, globs, and their errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from mailrelayd.config import ConfigError, build, expand
from mailrelayd.transports.smtp import SmtpSettings
from conftest import run_cli


def test_each_queue_table_takes_the_top_level_settings_and_its_own():
    """A [[queue]] table's keys override the top-level ones for that queue only."""
    config = build({"workers": 2, "envelope_from": "relay@example.org",
                    "queue": [{"db": "/srv/a/emailqueue.db"}, {"spool": "/srv/b/spool", "workers": 8}]}, {})
    first, second = config.queue_configs
    assert (first.db, first.workers, first.envelope_from) == (Path("/srv/a/emailqueue.db"), 2, "relay@example.org")
    assert (second.spool, second.workers, second.envelope_from) == (Path("/srv/b/spool"), 8, "relay@example.org")


def test_a_queue_table_may_choose_its_own_way_to_deliver():
    """A table's smtp_server replaces the top-level command for that queue, without a conflict."""
    config = build({"command": "/usr/bin/msmtp -t",
                    "queue": [{"db": "/a.db"}, {"db": "/b.db", "smtp_server": "mail.example.org"}]}, {})
    first, second = config.queue_configs
    assert first.command == ("/usr/bin/msmtp", "-t") and first.smtp.server is None
    assert second.smtp.server == "mail.example.org"


def test_a_queue_table_sending_by_smtp_takes_the_top_level_smtp_keys():
    """SMTP keys at the top level reach a [[queue]] table that names its own smtp_server."""
    config = build({"smtp_port": 587, "smtp_user": "relay",
                    "queue": [{"db": "/a.db", "smtp_server": "mail.example.org"}]}, {})
    [queue] = config.queue_configs
    assert queue.smtp == SmtpSettings(server="mail.example.org", port=587, user="relay")


def test_a_queue_tables_command_replaces_the_top_level_smtp_server():
    """A table's command replaces the top-level smtp_server for that queue; the other tables keep SMTP."""
    config = build({"smtp_server": "mail.example.org",
                    "queue": [{"db": "/a.db", "command": "/usr/bin/msmtp -t"}, {"db": "/b.db"}]}, {})
    first, second = config.queue_configs
    assert (first.smtp.server, first.command) == (None, ("/usr/bin/msmtp", "-t"))
    assert second.smtp.server == "mail.example.org"


def test_an_smtp_flag_wins_over_the_file():
    """--smtp-port given as a flag overrides the file's smtp_port."""
    config = build({"db": "/a.db", "smtp_server": "mail.example.org", "smtp_port": 25}, {"smtp_port": "587"})
    assert config.smtp.port == 587


def test_reading_the_config_loads_neither_ssl_nor_smtplib():
    """Importing config.py (and with it the SMTP settings) loads no ssl and no smtplib: only the transport needs them."""
    code = "import sys, mailrelayd.config; print(sorted({'ssl', 'smtplib'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_flags_win_over_every_queue_table():
    """A flag such as --workers applies to every queue, over the tables."""
    config = build({"queue": [{"db": "/a.db", "workers": 8}, {"db": "/b.db"}]}, {"workers": "3"})
    assert [q.workers for q in config.queue_configs] == [3, 3]


def test_a_db_flag_names_the_one_queue_instead_of_the_tables():
    """--db given with a config of [[queue]] tables means that queue alone (as admin commands use it)."""
    config = build({"queue": [{"db": "/a.db"}, {"db": "/b.db"}]}, {"db": "/c.db"})
    assert [q.db for q in config.queue_configs] == [Path("/c.db")]


@pytest.mark.parametrize("values, message", [
    ({"queue": [{"db": "/a.db", "log_file": "/x.log"}]}, "log_file applies to the whole process"),
    ({"queue": [{"db": "/a.db", "metrics": "127.0.0.1:9464"}]}, "metrics applies to the whole process"),
    ({"db": "/a.db", "queue": [{"db": "/b.db"}]}, "not both"),
    ({"queue": [{"db": "/a.db"}, {"db": "/a.db"}]}, "already another queue"),
    ({"queue": [{"workers": 2}]}, "give one queue"),
    ({"queue": [{"db": "/a.db", "workers": "many"}]}, "workers in [[queue]] 1"),
    ({"queue": [{"db": "/a.db", "smtp_port": 0}]}, "smtp_port in [[queue]] 1"),
    ({"queue": "not tables"}, "[[queue]] tables"),
    ({"queue": [{"spool": "/srv/*/spool", "state_dir": "/var/state"}]}, "spool glob"),
])
def test_bad_queue_tables_are_refused_with_one_line(values, message):
    """Each mistake in [[queue]] tables is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=None) as e:
        build(values, {}, "relay.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_utf8_headers_is_encode_unless_a_queue_keeps_the_bytes():
    """utf8_headers is encode by default, and a [[queue]] table may set keep for its queue alone."""
    config = build({"queue": [{"db": "/a.db"}, {"db": "/b.db", "utf8_headers": "keep"}]}, {})
    assert [q.utf8_headers for q in config.queue_configs] == ["encode", "keep"]


def test_bad_utf8_headers_exits_78_with_one_line(tmp_path):
    """A utf8_headers that is neither encode nor keep is refused at start with one line and exit status 78."""
    result = run_cli("--drain", "--db", str(tmp_path / "q.db"), "--utf8-headers", "raw")
    assert result.returncode == 78 and result.stderr.count("\n") == 1
    assert "bad value for --utf8-headers ('raw'): expected one of encode, keep" in result.stderr


def test_a_glob_expands_to_the_queues_that_exist_now(tmp_path):
    """db = "/srv/jails/*/emailqueue.db" stands for each matching file, in order."""
    for jail in ("b", "a"):
        (tmp_path / jail).mkdir()
        (tmp_path / jail / "emailqueue.db").touch()
    (tmp_path / "empty").mkdir()
    config = build({"queue": [{"db": f"{tmp_path}/*/emailqueue.db", "workers": 2}]}, {})
    found = expand(config)
    assert [q.db for q in found] == [tmp_path / "a" / "emailqueue.db", tmp_path / "b" / "emailqueue.db"]
    assert all(q.workers == 2 for q in found)


def test_a_spool_glob_skips_state_directories(tmp_path):
    """spool = "/srv/*/spool*" never takes a spool's own state directory (SPOOL.mailrelayd) for a spool."""
    (tmp_path / "a" / "spool").mkdir(parents=True)
    (tmp_path / "a" / "spool.mailrelayd").mkdir()
    config = build({"spool": f"{tmp_path}/*/spool*"}, {})
    assert [q.spool for q in expand(config)] == [tmp_path / "a" / "spool"]


def test_bad_queue_table_exits_78_with_one_line(tmp_path):
    """The command line reports a bad [[queue]] table with one line and exit status 78."""
    config = tmp_path / "relay.toml"
    config.write_text('[[queue]]\ndb = "/a.db"\npidfile = "/run/x.pid"\n')
    result = run_cli("--drain", "--config", str(config))
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1 and "pidfile applies to the whole process" in result.stderr


def test_drain_empties_every_queue_and_reports_the_worst_status(tmp_path, fake_sendmail):
    """--drain with two queues sends both queues' mail and exits 0."""
    from conftest import SqliteHarness, fossil_message

    first = SqliteHarness(tmp_path / "a" / "emailqueue.db")
    second = SqliteHarness(tmp_path / "b" / "emailqueue.db")
    first.enqueue(fossil_message(subject="one"))
    second.enqueue(fossil_message(subject="two"))
    config = tmp_path / "relay.toml"
    config.write_text(f'command = "{fake_sendmail.path} -ti"\n[[queue]]\ndb = "{first.path}"\n'
                      f'[[queue]]\ndb = "{second.path}"\n')
    result = run_cli("--drain", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert len(fake_sendmail.calls()) == 2 and first.queued() == second.queued() == 0


def test_check_config_shows_each_queue_table_and_checks_every_queue(tmp_path):
    """check-config prints each [[queue]] table's own settings and a glob's matches, and lists every queue's problem."""
    from conftest import SqliteHarness

    good = SqliteHarness(tmp_path / "a" / "emailqueue.db")
    config = tmp_path / "relay.toml"
    config.write_text(f'command = "/bin/true"\n[[queue]]\ndb = "{good.path}"\nworkers = 2\n'
                      f'[[queue]]\ndb = "{tmp_path}/missing/emailqueue.db"\n'
                      f'[[queue]]\ndb = "{tmp_path}/*/emailqueue.db"\n')
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 78
    assert result.stdout.count("[[queue]]") == 3 and "workers = 2" in result.stdout
    assert f"# matches now: {good.path}" in result.stdout
    assert result.stderr.splitlines() == [f"mailrelayd: queue directory {tmp_path}/missing: no such directory",
                                          f"mailrelayd: queue {tmp_path}/missing/emailqueue.db: no such file"]


def test_test_message_needs_one_queue(tmp_path):
    """test-message with several queues configured asks for --db or --spool (exit 64)."""
    config = tmp_path / "relay.toml"
    config.write_text('[[queue]]\ndb = "/a.db"\n[[queue]]\ndb = "/b.db"\n')
    result = run_cli("test-message", "bob@example.com", "--config", str(config))
    assert result.returncode == 64 and "--db or --spool" in result.stderr
