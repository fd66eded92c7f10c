#!/bin/bash
# Another user's flood against one user's latency (docs/security.md):
# NFLOOD clients of uid 65534 call zrpcd.ping with FC calls in flight each
# (default 64), niced unless NICE is set to nothing, while root's
# BlockingClient makes 3,000 sequential echo calls; prints root's p50 and
# p99, its calls/s and the broker's CPU ticks meanwhile. Needs root and a
# release build (cargo build --release --workspace --bins).
#
# usage: bench/scripts/flood_latency.sh NFLOOD
#   env B       directory of the binaries (default: target/release)
#   env ZRPCD   the broker binary (default: $B/zrpcd), to compare two
#   env FC      calls in flight per flooding client (default 64)
#   env NICE    prefix of the flooders (default: nice -n 19)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$ROOT/target/release}
D=$(mktemp -d)
chmod 755 "$D"
FP=""
trap 'kill $FP ${SP:-} ${ZP:-} 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
"${ZRPCD:-$B/zrpcd}" --socket-dir "$D" --log error & ZP=$!
for _ in $(seq 500); do [ -S "$D/zrpcd.sock" ] && break; sleep 0.01; done
export ZRPC_SOCKET_DIR=$D
"$B/zrpc-bench" service --dir "$D" < /dev/null & SP=$!
for _ in $(seq "$1"); do
  ${NICE-nice -n 19} setpriv --reuid 65534 --regid 65534 --clear-groups \
    "$B/zrpc-test-client" --service zrpcd --method ping --calls 3000000 \
    --concurrency "${FC:-64}" > /dev/null 2>&1 &
  FP="$FP $!"
done
sleep 1
ticks() { awk '{print $14+$15}' "/proc/$ZP/stat"; }
t0=$(ticks)
R=$(echo go | "$B/zrpc-bench" client --dir "$D" --flavour blocking --inflight 1 --warmup 100 --calls 3000 --size 64)
t1=$(ticks)
echo "$R" | awk -v n="$1" -v t=$((t1 - t0)) '/result/ {printf "flooders %d: p50 %.0f us p99 %.0f us, %.0f calls/s, broker ticks %d\n", n, $5/1000, $6/1000, $2/(($4-$3)/1e9), t}'
