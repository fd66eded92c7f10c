#!/bin/bash
# What a departing connection costs the broker while others have many
# calls pending (docs/security.md): 300 connections that each park one call
# and are killed, with 200,000 calls parked by four other connections, and
# with none. Prints the broker's CPU ticks (10 ms) for the 300 departures.
#
# usage: bench/scripts/departures.sh [ZRPCD] [ZRPC-TEST-PEER]
#   (default: target/release/zrpcd and target/release/zrpc-test-peer;
#    build them with `cargo build --release -p zrpcd -p zrpc-tests --bins`)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${1:-$ROOT/target/release/zrpcd}
PEER=${2:-$ROOT/target/release/zrpc-test-peer}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# wait_for FILE: until FILE says "sent" (bounded: 60 s)
wait_for() {
  for _ in $(seq 1200); do grep -q sent "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for $1" >&2; return 1
}
one() {
  local parked=$1 D B q pids=()
  D=$(mktemp -d)
  "$BIN" --socket-dir "$D" --log error --max-pending-per-conn 1000000 \
    --max-pending-total 2000000 & B=$!
  for _ in $(seq 500); do [ -S "$D/zrpcd.sock" ] && break; sleep 0.01; done
  export ZRPC_SOCKET_DIR=$D
  if [ "$parked" -gt 0 ]; then
    for k in 1 2 3 4; do
      "$PEER" park --service nobody --count $((parked / 4)) > "$D/p$k.out" & pids+=($!)
    done
    for k in 1 2 3 4; do wait_for "$D/p$k.out" || break; done
  fi
  local t0; t0=$(ticks $B)
  for _ in $(seq 300); do
    "$PEER" park --service nobody --count 1 > "$D/one.out" & q=$!
    wait_for "$D/one.out"
    kill -9 $q; wait $q 2>/dev/null
  done
  # The last departures are handled within a moment; not a synchronisation
  # (this is a measurement, not a test).
  sleep 1
  echo "$parked calls parked by others: $(( $(ticks $B) - t0 )) ticks for 300 departures"
  for p in "${pids[@]}"; do kill -9 "$p"; done
  kill $B; wait $B 2>/dev/null; rm -rf "$D"
}
one 200000
one 0
