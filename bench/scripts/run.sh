#!/bin/bash
# One client against a real broker and echo service, for profiling one
# process at a time (docs/performance.md).
#
# usage: bench/scripts/run.sh FLAVOUR SIZE INFLIGHT CALLS
#   FLAVOUR   current | multi | blocking | raw | bytebuf (zrpc-bench client --flavour)
#   env B     directory of zrpcd and zrpc-bench (default: target/release)
#   env ZARGS  extra zrpcd arguments (e.g. --busy-poll-us 0)
#   env PRE / PRES / PREZ   a command prefix for the client / the service / the broker,
#             e.g. PREZ="valgrind --tool=callgrind --callgrind-out-file=broker.cg"
# Prints the client's result line and the broker's and the service's CPU ticks.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$ROOT/target/release}
D=$(mktemp -d)
trap 'kill $ZP $SP 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
${PREZ:-} "$B/zrpcd" --socket-dir "$D" --log error ${ZARGS:-} & ZP=$!
for _ in $(seq 500); do [ -S "$D/zrpcd.sock" ] && break; sleep 0.01; done
${PRES:-} "$B/zrpc-bench" service --dir "$D" < /dev/null & SP=$!
# The service registers within the client's warm-up calls (they wait for it).
sleep "${SLEEP:-1}"
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
z0=$(ticks $ZP); s0=$(ticks $SP)
echo go | ${PRE:-} "$B/zrpc-bench" client --dir "$D" --flavour "$1" --inflight "$3" --warmup 20 --calls "$4" --size "$2"
echo "broker ticks $(( $(ticks $ZP) - z0 )) service ticks $(( $(ticks $SP) - s0 )) (10 ms each)"
