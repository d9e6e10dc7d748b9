#!/bin/sh
# Build the Debian package from this tree in one command: sh debian/build.sh [OUTDIR]
# It builds in a clean copy (nothing is written into the tree but the result) and leaves
# mailrelayd_VERSION_all.deb in OUTDIR (default: the top of the tree); install it with
# `apt install ./mailrelayd_VERSION_all.deb`. Needs the Build-Depends of debian/control:
#   apt-get install debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
out=$(cd "${1:-$top}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
mkdir "$work/src"
# The tree without what is not source: git's metadata, virtualenvs, earlier builds.
tar -C "$top" -cf - --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='./*.deb' \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.hypothesis . |
    tar -C "$work/src" -xf -
# Debian's own tools and python3 only, whatever else is first on PATH (pyenv, a venv).
(cd "$work/src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)
for deb in "$work"/*.deb; do
    cp "$deb" "$out/"
    echo "built $out/$(basename "$deb")"
done
