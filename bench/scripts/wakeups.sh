#!/bin/bash
# Sequential calls (1 in flight) through the raw relay and through zrpc's
# client flavours, with polling off everywhere, printing calls/s, p50 and
# the inter-processor interrupts per call ("CAL" and "RES" in /proc/interrupts: a
# wake-up of a task on another, idle CPU). docs/performance.md ("Where the
# sequential time goes").
#
# usage: bench/scripts/wakeups.sh [CALLS] [FLAVOUR...]
#   CALLS     calls per run (default 20000)
#   FLAVOUR   zrpc-bench client flavours (default: multi current blocking)
#   env B     directory of zrpcd and zrpc-bench (default: target/release)
#   env PRE   a command prefix for every process, e.g. PRE="taskset -c 0"
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$ROOT/target/release}
CALLS=${1:-20000}
shift || true
FLAVOURS=${*:-multi current blocking}
ipis() { awk '/^ *(CAL|RES):/{for(i=2;i<=NF;i++) if ($i ~ /^[0-9]+$/) n+=$i} END {print n}' /proc/interrupts; }
report() { # NAME CAL0 RESULT-LINE
  awk -v name="$1" -v cal="$(( $(ipis) - $2 ))" '/^result/ {
    printf "%-9s %7.0f calls/s  p50 %6.1f us  %.2f IPIs per call\n", name, $2/(($4-$3)/1e9), $5/1000, cal/$2 }' <<<"$3"
}

D=$(mktemp -d)
trap 'kill ${RP:-} ${SP:-} 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
${PRE:-} "$B/zrpc-bench" relay --path "$D/relay.sock" < /dev/null > /dev/null & RP=$!
for _ in $(seq 500); do [ -S "$D/relay.sock" ] && break; sleep 0.01; done
${PRE:-} "$B/zrpc-bench" raw-server --path "$D/relay.sock" < /dev/null > /dev/null & SP=$!
sleep 0.5
c0=$(ipis)
out=$(echo go | ${PRE:-} "$B/zrpc-bench" raw-client --path "$D/relay.sock" --inflight 1 --warmup 100 --calls "$CALLS" --size 64)
report relay "$c0" "$out"
kill $RP $SP; wait 2>/dev/null; RP= SP=

for f in $FLAVOURS; do
  c0=$(ipis)
  out=$(B=$B PRE="${PRE:-}" PRES="${PRE:-}" PREZ="${PRE:-}" ZARGS='--busy-poll-us 0' ZRPC_BUSY_POLL_US=0 \
    bash "$ROOT/bench/scripts/run.sh" "$f" 64 1 "$CALLS")
  report "$f" "$c0" "$out"
done
