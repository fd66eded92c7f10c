#!/usr/bin/env bash
# Packaging check (issue 20), run by .ci/run:
#  1. `cargo package` of every publishable crate, verified: cargo packages
#     the workspace's crates together and builds each .crate against the
#     others through a temporary local registry, so the path dependencies
#     (zrpc-proto <- zrpc-io <- zrpc-client ...) verify before any of them
#     is on crates.io.
#  2. `cargo deb -p zrpcd` (cargo-deb, installed if missing): the package
#     `zrpc`, whose contents (`dpkg-deb -c`) must hold the binaries, the
#     man pages, the units and the policy conffile, and whose maintainer
#     scripts must not enable or start anything.
# Usage: bash scripts/package-check.sh   (ZRPC_SKIP_DEB=1: step 1 only)
set -euo pipefail
cd "$(dirname "$0")/.."

CRATES=(zrpc-proto zrpc-io zrpc-macros zrpc-client zrpc-service zrpcd zrpc-cli)

# Verification unpacks each packaged crate under $CARGO_HOME/registry as
# if it came from crates.io, and cargo reuses an unpacked name-version it
# finds there: a copy left by an earlier run of this check (same version,
# older code) would be built instead of the one just packaged. Remove ours.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
for c in "${CRATES[@]}"; do
    rm -rf "$cargo_home"/registry/src/*/"$c"-0.* "$cargo_home"/registry/cache/*/"$c"-0.*.crate
done

echo "package-check: cargo package (verified) for ${CRATES[*]}"
args=()
for c in "${CRATES[@]}"; do args+=(-p "$c"); done
cargo package --locked --allow-dirty "${args[@]}"
for c in "${CRATES[@]}"; do
    f=$(ls target/package/"$c"-*.crate | head -n1)
    files=$(tar -tzf "$f")
    for want in README.md LICENSE-MIT LICENSE-APACHE; do
        grep -q "/$want\$" <<<"$files" || { echo "package-check: $f has no $want" >&2; exit 1; }
    done
done

if [ "${ZRPC_SKIP_DEB:-0}" = 1 ]; then
    echo "package-check: .deb skipped (ZRPC_SKIP_DEB=1)"
    exit 0
fi

if ! command -v cargo-deb >/dev/null; then
    echo "package-check: installing cargo-deb"
    cargo install cargo-deb --locked
fi
command -v dpkg-deb >/dev/null || { echo "package-check: dpkg-deb is missing (Debian package dpkg)" >&2; exit 1; }

echo "package-check: release build of zrpcd and zrpc, then cargo deb -p zrpcd"
# cargo-deb builds only zrpcd's own binaries; zrpc comes from zrpc-cli.
cargo build --release --locked -p zrpcd -p zrpc-cli
deb=$(cargo deb -p zrpcd --no-build | tail -n1)
[ -f "$deb" ] || { echo "package-check: cargo deb produced no package ($deb)" >&2; exit 1; }
echo "package-check: $deb"
contents=$(dpkg-deb -c "$deb")
missing=0
for want in \
    ./usr/bin/zrpcd ./usr/bin/zrpc \
    ./usr/share/man/man8/zrpcd.8.gz ./usr/share/man/man1/zrpc.1.gz ./usr/share/man/man1/zrpc-stats.1.gz \
    /systemd/system/zrpcd.service /systemd/system/zrpcd.socket \
    ./etc/zrpc/policy.toml ./usr/share/doc/zrpc/README.md ./usr/share/doc/zrpc/copyright \
    ./usr/share/doc/zrpc/LICENSE-MIT ./usr/share/doc/zrpc/LICENSE-APACHE; do
    if ! grep -q -- "$want\$" <<<"$contents"; then
        echo "package-check: $deb lacks $want" >&2
        missing=1
    fi
done
[ "$missing" = 0 ] || { echo "$contents" >&2; exit 1; }
if grep -q "test_server\|test_client" <<<"$contents"; then
    echo "package-check: the example binaries must not be packaged" >&2
    exit 1
fi

ctrl=$(mktemp -d)
trap 'rm -rf "$ctrl"' EXIT
dpkg-deb -e "$deb" "$ctrl"
grep -qx "/etc/zrpc/policy.toml" "$ctrl/conffiles" || { echo "package-check: policy.toml is not a conffile" >&2; exit 1; }
grep -q "daemon-reload" "$ctrl/postinst" || { echo "package-check: postinst does no daemon-reload" >&2; exit 1; }
# Installing must not enable or start the broker: no `start`, and an
# `enable` only under `was-enabled` (re-creating the links of a unit the
# admin had enabled); try-restart of a broker that already runs is fine.
grep -v '^[[:space:]]*#' "$ctrl/postinst" > "$ctrl/postinst.code"
if grep -E "deb-systemd-invoke (--quiet )?start|systemctl (--system )?(enable|start)" "$ctrl/postinst.code" \
    || awk '/deb-systemd-helper (--quiet )?enable/ && prev !~ /was-enabled/ {bad=1} NF {prev=$0} END {exit !bad}' "$ctrl/postinst.code"; then
    echo "package-check: postinst enables or starts a unit" >&2
    exit 1
fi
echo "package-check: ok ($deb: binaries, man pages, units, conffile; postinst reloads systemd and starts nothing)"
