#!/usr/bin/env bash
# A laptop shares a folder; a headless server keeps a copy with the READ-ONLY key: it receives
# every change the laptop makes and can never change the laptop's files (its own edits are
# refused by every read-write peer, and `backer revert` on the server undoes them).
#
#   examples/readonly_server.sh [WORKDIR]     # runs the whole story on 127.0.0.1, then stops
#
# On two real machines the same commands apply, with `--listen 0.0.0.0:22100` on the server
# and the laptop's `--peer SERVER:22100` (or mDNS on a LAN, or the DHT).
set -euo pipefail
work=${1:-$(mktemp -d)}
python=${PYTHON:-python3}
backer() { "$python" -m backer "$@"; }
wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local end=$((SECONDS + $1)); shift
  until "$@"; do
    if ((SECONDS > end)); then
      echo "timed out waiting for: $*" >&3
      tail -n 20 "$work"/*.log >&3 2>/dev/null || true
      exit 1
    fi
    sleep 0.1
  done
}
mkdir -p "$work/laptop-docs"
backer --home "$work/laptop" init "$work/laptop-docs" >/dev/null
read_only=$(backer --home "$work/laptop" keys "$work/laptop-docs" | grep -o 'bkr1[0-9a-z]*')
backer --home "$work/server" join "$read_only" "$work/server-copy"

exec 3>&2  # wait_for's complaint reaches stderr even where a command's own is silenced
server_port=${SERVER_PORT:-22170}
laptop_port=${LAPTOP_PORT:-$((server_port + 1))}
# Started directly (not through the function), so that $! is the node itself and the trap
# below stops it; a function in the background is a subshell whose death leaves it running.
"$python" -m backer --home "$work/server" run --listen "127.0.0.1:$server_port" \
  --discovery none >"$work/server.log" 2>&1 &
server=$!
"$python" -m backer --home "$work/laptop" run --listen "127.0.0.1:$laptop_port" \
  --peer "127.0.0.1:$server_port" --discovery none >"$work/laptop.log" 2>&1 &
laptop=$!
trap 'kill $server $laptop 2>/dev/null; wait 2>/dev/null' EXIT

echo "quarterly numbers" >"$work/laptop-docs/report.txt"
wait_for 30 grep -q "quarterly numbers" "$work/server-copy/report.txt" 2>/dev/null
echo "the server received report.txt"

echo "the server's own edit" >"$work/server-copy/report.txt"
wait_for 30 grep -q "refused report.txt" "$work/laptop.log"
grep -q "quarterly numbers" "$work/laptop-docs/report.txt"
echo "the laptop refused the server's edit; its report.txt is unchanged"
wait_for 30 grep -q "stay on this device" "$work/server.log"
wait_for 30 bash -c "'$python' -m backer --home '$work/server' status '$work/server-copy' | grep -q 'backer revert'"
echo "the server says its edit stays local, and how to undo it: backer revert"

# `revert` writes the folder's index, which the running node owns: stop it, revert, restart.
kill "$server"
wait "$server" 2>/dev/null || true
backer --home "$work/server" revert "$work/server-copy"
"$python" -m backer --home "$work/server" run --listen "127.0.0.1:$server_port" \
  --discovery none >>"$work/server.log" 2>&1 &
server=$!
wait_for 30 grep -q "quarterly numbers" "$work/server-copy/report.txt" 2>/dev/null
echo "after backer revert the server holds the laptop's report.txt again (its edit is a version)"
