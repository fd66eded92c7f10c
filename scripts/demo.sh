#!/usr/bin/env bash
# Builds zrpc, starts the broker and the original example service in a
# private socket directory, calls it with the blocking and the async client,
# then stops everything. Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet

dir=$(mktemp -d /tmp/zrpc-demo.XXXXXX)
export ZRPC_SOCKET_DIR="$dir"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

./target/release/zrpcd & pids+=($!)
# Wait (bounded) for the broker's socket.
for _ in $(seq 200); do [ -S "$dir/zrpcd.sock" ] && break; sleep 0.05; done
[ -S "$dir/zrpcd.sock" ] || { echo "zrpcd did not start" >&2; exit 1; }
./target/release/test_server & pids+=($!)

# The client waits (up to its timeout) for test_server to register, as the
# broker parks calls to names that are not registered yet.
echo "--- blocking client"
./target/release/test_client
echo "--- async client"
./target/release/test_client_async
echo "--- demo OK"
