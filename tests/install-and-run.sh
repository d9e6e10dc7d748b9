#!/bin/sh
# Install everything the tests need (Debian or Ubuntu, as root), check the code with ruff and
# mypy, then run the whole suite, including tests/test_package.py, which builds the Debian
# package, installs it on this machine, uses it and purges it again, and
# tests/test_pipx_install.py (the generic install).
# Extra arguments go to pytest, e.g. `sh tests/install-and-run.sh -k sqlite -x`.
set -eu
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Postfix is only used through private instances the tests start; keep the system one unconfigured.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
# Mail software for the tests; the package's build tools (debian/control's Build-Depends),
# its dependencies (Debian's Python libraries), what checks it (lintian, man, logrotate), pipx.
apt-get install -y -q --no-install-recommends fossil postfix msmtp sqlite3 ca-certificates systemd \
    python3-venv debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
    python3-watchdog python3-structlog python3-daemon python3-prometheus-client python3-tqdm sqlite-utils adduser \
    lintian man-db logrotate pipx

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# mailrelayd's dependencies at their floors, the versions Debian 12 has (which the package
# uses): so the suite proves that those versions work.
.venv/bin/python -c 'import tomllib; print("\n".join(d.replace(">=", "==")
    for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >.venv/floors.txt
.venv/bin/pip install -q -c .venv/floors.txt -e '.[test]'
.venv/bin/ruff check mailrelayd
.venv/bin/mypy
export MAILRELAYD_TEST_INSTALL=1
exec .venv/bin/python -m pytest "$@"
