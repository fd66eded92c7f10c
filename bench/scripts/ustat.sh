#!/bin/bash
# User and system CPU per call of each process class over the 16-client
# phase of many_clients (or NCL x INFL), for zrpc or the raw relay
# (docs/performance.md).
#
# usage: bench/scripts/ustat.sh zrpc|relay CALLS_PER_CLIENT
#   env B      directory of zrpcd and zrpc-bench (default: target/release)
#   env NCL    client processes (default 16), INFL calls in flight each
#              (default 16), FLAV the zrpc client flavour (default current;
#              multi is the README's #[tokio::main] client; for the relay,
#              tokio-multi or tokio-current run the tokio floor client,
#              bench/src/raw_tokio.rs, instead of the blocking raw client)
#   env CENV   environment for the clients, e.g. CENV=ZRPC_BUSY_POLL_US=0
#   env ZNICE  a nice value for the broker (or the relay), e.g. ZNICE=-5
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$ROOT/target/release}
D=$(mktemp -d)
trap 'kill $ZP $SP 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
if [ "$1" = zrpc ]; then
  "$B/zrpcd" --socket-dir "$D" --log error & ZP=$!
  for _ in $(seq 500); do [ -S "$D/zrpcd.sock" ] && break; sleep 0.01; done
  "$B/zrpc-bench" service --dir "$D" < /dev/null & SP=$!
  CL="$B/zrpc-bench client --dir $D --flavour ${FLAV:-current} --inflight ${INFL:-16} --warmup 100 --calls $2 --size 64"
else
  "$B/zrpc-bench" relay --path "$D/relay.sock" < /dev/null > /dev/null & ZP=$!
  for _ in $(seq 500); do [ -S "$D/relay.sock" ] && break; sleep 0.01; done
  "$B/zrpc-bench" raw-server --path "$D/relay.sock" < /dev/null > /dev/null & SP=$!
  case "${FLAV:-}" in
    tokio-*) CL="$B/zrpc-bench raw-tokio-client --flavour ${FLAV#tokio-} --path $D/relay.sock --inflight ${INFL:-16} --warmup 100 --calls $2 --size 64" ;;
    *) CL="$B/zrpc-bench raw-client --path $D/relay.sock --inflight ${INFL:-16} --warmup 100 --calls $2 --size 64" ;;
  esac
fi
sleep 0.5
[ -n "${ZNICE:-}" ] && renice -n "$ZNICE" -p "$ZP" > /dev/null
st() { awk '{print $14, $15}' "/proc/$1/stat"; }
read -r zu0 zs0 < <(st $ZP); read -r su0 ss0 < <(st $SP)
cat > "$D/go.sh" <<EOS
PIDS=""
for i in \$(seq ${NCL:-16}); do (echo go | env ${CENV:-} $CL > $D/out.\$i) & PIDS="\$PIDS \$!"; done
wait \$PIDS
EOS
/usr/bin/time -f "%U %S" -o "$D/time" bash "$D/go.sh"
read -r zu1 zs1 < <(st $ZP); read -r su1 ss1 < <(st $SP)
N=$(cat "$D"/out.* | grep result | awk '{n+=$2} END {print n}')
read -r cu cs < "$D/time"
cat "$D"/out.* | grep result | awk '{ if (min==""||$3<min) min=$3; if ($4>max) max=$4; n+=$2 } END { printf "%.0f calls/s ", n/((max-min)/1e9) }'
awk -v n="$N" -v zu=$((zu1-zu0)) -v zs=$((zs1-zs0)) -v su=$((su1-su0)) -v ss=$((ss1-ss0)) -v cu="$cu" -v cs="$cs" 'BEGIN { f=1e4/n; printf "us/call user/sys: broker %.2f/%.2f service %.2f/%.2f clients %.2f/%.2f total %.2f/%.2f\n", zu*f, zs*f, su*f, ss*f, cu*1e6/n, cs*1e6/n, (zu+su)*f+cu*1e6/n, (zs+ss)*f+cs*1e6/n }'
