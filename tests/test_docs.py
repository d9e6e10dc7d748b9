"""The manual pages and the bash completion, written from the parsers and option tables."""

import shutil
import subprocess

import pytest

from mailrelayd import inject
from mailrelayd.cli import docs, parsers
from mailrelayd.config import OPTIONS


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    assert docs.main([str(out)]) == 0
    return out


def test_every_option_of_every_command_is_in_mailrelayd_8(written):
    """Each flag any command's parser declares is described in mailrelayd(8)."""
    page = (written / "mailrelayd.8").read_text()
    flags = {flag for parser in parsers().values() for action in parser._actions for flag in action.option_strings
             if flag not in ("-h", "--help")}
    assert flags and [flag for flag in flags if docs.roff(flag) not in page] == []


def test_every_configuration_key_is_in_mailrelayd_toml_5(written):
    """Each key of the configuration's option table is described in mailrelayd.toml(5)."""
    page = (written / "mailrelayd.toml.5").read_text()
    assert [o.key for o in OPTIONS if f"\\fB{docs.roff(o.key)}\\fR" not in page] == []


def test_every_injector_option_is_in_mailrelayd_sendmail_8(written):
    """Each option letter the injector accepts is described in mailrelayd-sendmail(8), and --spool."""
    page = (written / "mailrelayd-sendmail.8").read_text()
    letters = inject._FLAGS | inject._WITH_ARGUMENT
    assert [letter for letter in letters if f"\\fB\\-{letter}\\fR" not in page] == []
    assert "\\fB\\-\\-spool\\fR" in page


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man-db (sh tests/install-and-run.sh installs it)")
@pytest.mark.parametrize("page", ["mailrelayd.8", "mailrelayd-sendmail.8", "mailrelayd.toml.5"])
def test_each_page_renders_without_a_warning(written, page):
    """man --warnings renders each page with no warning at all."""
    result = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", str(written / page)], capture_output=True,
                            text=True, env={"MANWIDTH": "80", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stderr == "" and "NAME" in result.stdout


@pytest.mark.parametrize("line, expected", [("mailrelayd li", {"list"}), ("mailrelayd purge --re", {"--refused"}),
                                            ("mailrelayd --rate", {"--rate-limit"})])
def test_bash_completes_commands_and_their_options(written, line, expected):
    """The completion offers the commands, and each command's own options."""
    words = line.split()
    script = (f'source {written / "mailrelayd"}; COMP_WORDS=({" ".join(words)}); COMP_CWORD={len(words) - 1};'
              ' _mailrelayd; printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert set(result.stdout.split()) == expected
