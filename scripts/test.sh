#!/usr/bin/env bash
# The README's test command: every test of the project.
#
#   bash scripts/test.sh [cargo test options]
#
# 1. `cargo test --workspace --locked`: the Rust tests (real zrpcd, real
#    processes), the Python package's pytest suite (tests/tests/python.rs)
#    and the doc-tests. The NATS bridge tests print SKIPPED there: they need
#    zrpcd built with its optional feature `nats`.
# 2. The NATS bridge (docs/bridge.md): zrpcd built with `--features nats`,
#    then tests/tests/bridge.rs against a nats-server the tests start
#    (ZRPC_TEST_BRIDGE=1 makes a skip a failure) and the bridge's unit
#    tests; then the default zrpcd is built again. Without nats-server
#    (Debian: apt-get install nats-server) this part says SKIPPED, and
#    fails under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked "$@"

if command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ]; then
    echo "==> the NATS bridge (zrpcd --features nats, tests/tests/bridge.rs)"
    cargo build -p zrpcd --features nats -p zrpc-cli --locked
    ZRPC_TEST_BRIDGE=1 cargo test -p zrpc-tests --test bridge --locked "$@"
    cargo test -p zrpcd --features nats --lib --locked "$@" bridge::
    cargo build -p zrpcd --locked
else
    echo "SKIPPED: the NATS bridge tests (tests/tests/bridge.rs) need nats-server on PATH or in /usr/sbin (Debian: apt-get install nats-server)" >&2
    if [ "${CI:-}" = true ]; then
        exit 1
    fi
fi
