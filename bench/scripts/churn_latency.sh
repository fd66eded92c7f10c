#!/bin/bash
# Connection churn against another user's calls (docs/security.md): uid
# 65534 connects, completes the handshake and closes in a loop on THREADS
# threads (default 8), while uid 65533 makes 50 zrpcd.stats calls on one
# connection (its process start included); prints the probe's time idle
# and during the churn, and the connections the broker accepted in one
# second of it. Needs root and a release build (cargo build --release
# --workspace --bins).
#
# usage: bench/scripts/churn_latency.sh
#   env B        directory of the binaries (default: target/release)
#   env THREADS  churning threads (default 8)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$ROOT/target/release}
D=$(mktemp -d)
chmod 755 "$D"
"$B/zrpcd" --socket-dir "$D" --log error & ZP=$!
CP=
trap '[ -n "$CP" ] && kill $CP 2>/dev/null; wait $CP 2>/dev/null; kill $ZP 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 500); do [ -S "$D/zrpcd.sock" ] && break; sleep 0.01; done
as() { local uid=$1; shift; exec setpriv --reuid="$uid" --regid="$uid" --clear-groups env ZRPC_SOCKET_DIR="$D" "$@"; }
probe() {
  local t0 t1 n
  t0=$(date +%s%N)
  n=$(as 65533 "$B/zrpc-test-peer" probe-stats --count 50 2>&1 | grep -c '^calls')
  t1=$(date +%s%N)
  echo "$n calls in $(( (t1 - t0) / 1000 )) us"
}
echo "idle:  $(probe)"
# The introspection quota (100 a second) refills.
sleep 1.1
as 65534 "$B/zrpc-test-peer" churn --threads "${THREADS:-8}" --count 1000000 > /dev/null & CP=$!
sleep 1
echo "churn: $(probe)"
total() { ZRPC_SOCKET_DIR="$D" "$B/zrpc" stats 2>/dev/null | awk '/^connections /{print $4}'; }
c0=$(total); sleep 1; c1=$(total)
echo "connections accepted in 1 s of churn: $(( c1 - c0 ))"
