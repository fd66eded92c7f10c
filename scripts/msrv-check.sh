#!/usr/bin/env bash
# The declared minimum Rust (workspace `rust-version`, inherited by every
# member) must be at least what every locked dependency declares it needs.
# That the code itself builds with it is checked by clippy's
# `incompatible_msrv` lint (std APIs newer than `rust-version` are
# warnings, and CI's clippy denies warnings); a toolchain of that version
# cannot be installed on these machines, so nothing builds with it here.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
members = set(m["workspace_members"])
def v(s):
    return tuple(int(x) for x in (s or "0").split(".")) + (0,) * (3 - len((s or "0").split(".")))
ours = {p["name"]: p.get("rust_version") for p in m["packages"] if p["id"] in members}
declared = set(ours.values())
if len(declared) != 1 or None in declared:
    sys.exit(f"msrv: every member must inherit one rust-version, found {ours}")
msrv = declared.pop()
need = max(((v(p.get("rust_version")), p["name"], p.get("rust_version"))
            for p in m["packages"] if p["id"] not in members), default=((0,), "-", None))
if v(msrv) < need[0]:
    sys.exit(f"msrv: rust-version {msrv} is below what {need[1]} needs ({need[2]})")
print(f"msrv: rust-version {msrv}; the most demanding locked dependency is {need[1]} ({need[2]})")
'
