#!/usr/bin/env bash
# Runs every fuzz target for RUNS executions (default 10 million), one at a
# time, from the seeds plus the corpus kept in fuzz/corpus/; prints each
# target's final libFuzzer line. Needs cargo-fuzz (`cargo install cargo-fuzz`).
# RUSTC_BOOTSTRAP=1 lets the stable toolchain take the flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-10000000}
TARGETS=${TARGETS:-"frame entry worker_reply jwt ws_frames resp"}
export RUSTC_BOOTSTRAP=1
for target in $TARGETS; do
  mkdir -p "corpus/$target"
  start=$(date +%s)
  cargo fuzz run --sanitizer none --release "$target" "corpus/$target" "seeds/$target" -- \
    -runs="$RUNS" -max_len=4096 -timeout=10 -print_final_stats=1 2>&1 \
    | tee "/tmp/fuzz-$target.log" | grep -E "^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|panicked|ERROR|SUMMARY" || true
  echo "$target: $(( $(date +%s) - start )) s"
done
