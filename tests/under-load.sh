#!/bin/sh
# Run the whole suite N times in a row (default 5) with two CPU-bound processes beside it,
# as issue 10 asks: the tests must not depend on an idle machine. Run it after
# tests/install-and-run.sh has set up .venv; extra arguments go to pytest.
# Prints one summary line per run; exits 1 if any run failed.
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
sh -c 'while :; do :; done' & hog1=$!
sh -c 'while :; do :; done' & hog2=$!
trap 'kill $hog1 $hog2 2>/dev/null' EXIT INT TERM
failed=0
i=1
while [ "$i" -le "$runs" ]; do
    echo "run $i of $runs, $(date +%T)"
    MAILRELAYD_TEST_INSTALL=${MAILRELAYD_TEST_INSTALL-1} .venv/bin/python -m pytest -q -p no:cacheprovider "$@" \
        >.venv/under-load-$i.log 2>&1 || failed=1
    tail -n 1 .venv/under-load-$i.log
    i=$((i + 1))
done
exit $failed
