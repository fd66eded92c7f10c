#!/bin/bash
# What a flood of zrpcd.stats calls costs the broker (docs/security.md):
# uid 65533 registers 256 names (so that each answer carries 256 rows,
# ~100 KB), then uid 65534 makes CALLS zrpcd.stats calls, 4 in flight, its
# answers not decoded. Prints the calls answered and refused, the wall
# time and the broker's CPU. Needs root (the two other uids) and a
# release build (cargo build --release -p zrpcd -p zrpc-tests --bins).
#
# usage: bench/scripts/introspection_flood.sh RATE CALLS
#   RATE   [quota] introspection_per_second (0: no limit)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$ROOT/target/release}
D=$(mktemp -d)
chmod 755 "$D"
trap 'kill ${RP:-} ${ZP:-} 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
printf '[quota]\nintrospection_per_second = %s\n' "$1" > "$D/policy.toml"
"$B/zrpcd" --socket-dir "$D" --policy "$D/policy.toml" --log error --max-names-per-conn 2048 & ZP=$!
for _ in $(seq 500); do [ -S "$D/zrpcd.sock" ] && break; sleep 0.01; done
export ZRPC_SOCKET_DIR=$D
as() { setpriv --reuid "$1" --regid "$1" --clear-groups "${@:2}"; }
as 65533 "$B/zrpc-test-peer" register-many --prefix name_with_a_long_row_ --count 256 > "$D/reg.out" & RP=$!
for _ in $(seq 500); do grep -q registered "$D/reg.out" 2>/dev/null && break; sleep 0.01; done
ticks() { awk '{print $14+$15}' "/proc/$ZP/stat"; }
t0=$(ticks); s0=$(date +%s%N)
R=$(as 65534 "$B/zrpc-test-client" --service zrpcd --method stats --calls "$2" --concurrency 4 2>/dev/null)
s1=$(date +%s%N); t1=$(ticks)
ms=$(( (s1 - s0) / 1000000 ))
# zrpc-test-client counts answers of a method other than echo as
# "mismatched", refusals as "failed".
echo "rate $1: $R; ${ms} ms; broker $(( (t1 - t0) * 10 )) ms of CPU"
