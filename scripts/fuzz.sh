#!/usr/bin/env bash
# Coverage-guided fuzzing of the wire format (zrpc-proto) with cargo-fuzz.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: frame_decoder, envelope and broker) for its share of
# SECONDS (default 60, split evenly). Installs cargo-fuzz from crates.io if it
# is missing. cargo-fuzz wants a nightly toolchain for -Zsanitizer; on a
# stable toolchain RUSTC_BOOTSTRAP=1 unlocks the same flags. AddressSanitizer
# is used when the toolchain ships its runtime, otherwise the script falls
# back to `--sanitizer none` (libFuzzer still finds panics and hangs).
#
# The committed seed corpus is fuzz/corpus/<target>/ and is only read; new
# inputs go to fuzz/work/<target>/ (ignored by git). A crash is saved in
# fuzz/artifacts/<target>/ and the script exits non-zero; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# from the repository root, then fix it with a regression test in
# zrpc-proto/src/tests.rs.
#
# Exit status: 0 when every target ran clean, 1 on a crash, 2 when fuzzing
# is not possible here (cargo-fuzz cannot be installed or the targets do
# not build); the reason is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

total=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame_decoder envelope broker)
fi
per=$((total / ${#targets[@]}))
[ "$per" -ge 1 ] || per=1

export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz from crates.io (about a minute on 2 cores)"
    if ! cargo install --locked cargo-fuzz; then
        echo "fuzz.sh: cannot install cargo-fuzz" >&2
        exit 2
    fi
fi

# AddressSanitizer if this toolchain can link it, else no sanitizer.
sanitizer=address
if ! cargo fuzz build --sanitizer address "${targets[@]:0:1}" >/tmp/zrpc-fuzz-build.$$ 2>&1; then
    echo "fuzz.sh: build with AddressSanitizer failed, retrying with --sanitizer none:"
    tail -n 5 /tmp/zrpc-fuzz-build.$$
    sanitizer=none
    if ! cargo fuzz build --sanitizer none "${targets[@]:0:1}" >/tmp/zrpc-fuzz-build.$$ 2>&1; then
        tail -n 20 /tmp/zrpc-fuzz-build.$$ >&2
        rm -f /tmp/zrpc-fuzz-build.$$
        echo "fuzz.sh: the fuzz targets do not build with this toolchain" >&2
        exit 2
    fi
fi
rm -f /tmp/zrpc-fuzz-build.$$

status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    echo "==> fuzzing $t for ${per}s (sanitizer: $sanitizer)"
    log=fuzz/work/$t.log
    start=$(date +%s)
    # -timeout: one input taking over 10 s counts as a hang (a crash);
    # -rss_limit_mb: the decoder must not allocate from untrusted lengths.
    if cargo fuzz run --sanitizer "$sanitizer" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
        status=1
    fi
    end=$(date +%s)
    runs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    cov=$(grep -aoE '#[0-9]+[[:space:]]+DONE[[:space:]]+cov: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    echo "$t: $result, ${runs:-?} executions in $((end - start))s (including build), coverage ${cov:-?} edges"
    if [ "$result" = CRASH ]; then
        tail -n 40 "$log"
        ls -1 "fuzz/artifacts/$t" >&2 || true
    fi
done
exit $status
