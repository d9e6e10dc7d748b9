#!/bin/sh
# Regenerate examples/emailqueue.db: a small real Fossil mail queue (4 messages) written
# by the fossil binary itself (email-send-method=db), for trying mailrelayd without an MTA:
#
#   cp examples/emailqueue.db /tmp/q.db
#   mailrelayd --drain --db /tmp/q.db --maildir /tmp/mail     # then look in /tmp/mail/new
#   (as root, add --allow-root: mailrelayd otherwise refuses to relay as root)
#
# Needs: fossil (2.21 as in Debian 12) and sqlite3. Usage: sh examples/make-example-queue.sh [OUT]
set -eu

out=${1:-"$(cd "$(dirname "$0")" && pwd)/emailqueue.db"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
queue="$work/emailqueue.db"
repo="$work/demo.fossil"

# Fossil's user name, and a private HOME so its global config (~/.config/fossil.db)
# is not touched.
export USER=admin HOME="$work/home"
mkdir "$HOME"

fossil init "$repo" >/dev/null
fossil settings email-send-method db -R "$repo"
fossil settings email-send-db "$queue" -R "$repo"
fossil settings email-self noreply@example.org -R "$repo"
# Fossil 2.21 queues no subscriber alert (and says nothing) unless both are set:
fossil settings email-subname "Demo Project" -R "$repo"
fossil settings email-url https://fossil.example.org/demo -R "$repo"

# 1. A test message to two addresses (one message, both in To:).
printf '%s\n' \
    'Hello from Fossil. This message was queued by "fossil alerts test-message".' \
    'It is quoted-printable: = signs and non-ASCII text (café, über) are encoded.' \
    > "$work/body.txt"
fossil alerts test-message bob@example.com carol@example.net \
    -S "Test message from Fossil" --body "$work/body.txt" -R "$repo"

# 2. Real subscriber alerts: three verified subscribers to check-ins ("c"), one
#    check-in, then "fossil alerts send" queues one message per subscriber.
fossil alerts status -R "$repo" >/dev/null   # creates the subscriber table
sqlite3 "$repo" "
  INSERT INTO subscriber(semail, sverified, sdonotcall, sdigest, ssub, sctime, mtime, smip, lastContact)
  SELECT column1, 1, 0, 0, 'c', CAST(strftime('%s','now') AS INT), CAST(strftime('%s','now') AS INT),
         '127.0.0.1', CAST(julianday('now') - 2440587.5 AS INT)
  FROM (VALUES ('alice@example.com'), ('dave@example.net'), ('erin@example.org'));"
mkdir "$work/checkout"
(
    cd "$work/checkout"
    fossil open "$repo" >/dev/null
    printf 'Hello, world.\n' > hello.txt
    fossil add hello.txt >/dev/null
    fossil commit -m "Add hello.txt" --no-warnings >/dev/null
    fossil close >/dev/null
)
fossil alerts send -R "$repo"

# Make it one small self-contained file (no -wal beside it).
sqlite3 "$queue" "PRAGMA journal_mode=DELETE;" "VACUUM;" >/dev/null
test "$(sqlite3 "$queue" 'SELECT count(*) FROM email')" -eq 4
cp "$queue" "$out"
echo "wrote $out: $(sqlite3 "$out" 'SELECT count(*) FROM email') messages, $(wc -c < "$out") bytes"
