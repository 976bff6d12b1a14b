#!/usr/bin/env bash
# Fuzz smoke: builds the cargo-fuzz targets in fuzz/ (a workspace of its own)
# and runs each for FUZZ_SECONDS (default 20) from its seeds, failing on any
# crash, panic, timeout or leak libFuzzer reports. Meant to be called from
# .ci/run after the tests. The toolchain is stable: RUSTC_BOOTSTRAP=1 lets it
# take the unstable flags cargo-fuzz passes (sanitizer coverage); no
# sanitizer runtime is used (the crates forbid unsafe code), debug assertions
# are on. Costs on the 2-core machine: cargo-fuzz install about 1.5 min,
# the instrumented build about 6 to 11 min from a clean fuzz/target, then
# FUZZ_SECONDS per target (6 targets).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root/fuzz"
seconds=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1 CARGO_TERM_COLOR=never

if ! cargo fuzz --version > /dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

targets=$(cargo fuzz list)
cargo fuzz build --sanitizer none --release
for target in $targets; do
    scratch=$(mktemp -d)
    echo "fuzz $target for ${seconds}s"
    # The corpus grows in a scratch directory; the committed seeds are only read.
    cargo fuzz run --sanitizer none --release "$target" "$scratch" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -timeout=10 -print_final_stats=1 2>&1 \
        | grep -E "^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|panicked|ERROR|SUMMARY|Test unit written"
    rm -rf "$scratch"
done
