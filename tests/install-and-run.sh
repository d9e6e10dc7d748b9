#!/bin/sh
# Install everything the tests need (Debian or Ubuntu, as root), check the code with ruff and
# mypy, then run the whole suite.
# Extra arguments go to pytest, e.g. `sh tests/install-and-run.sh -k sqlite -x`.
set -eu
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Postfix is only used through private instances the tests start; keep the system one unconfigured.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get install -y -q --no-install-recommends fossil postfix msmtp sqlite3 ca-certificates systemd

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check mailrelayd
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
