#!/usr/bin/env bash
# Runs one fuzz target for RUNS executions (default 10 M) from the committed seeds plus its
# growing corpus, on one core. Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). Crashes land in fuzz/artifacts/<target>/.
#   bash fuzz/run.sh lora            # 10 M executions
#   RUNS=100000 bash fuzz/run.sh safetensors
#   MAX_LEN=4096 bash fuzz/run.sh lora   # shorter inputs, faster
set -euo pipefail
cd "$(dirname "$0")"
target="$1"
runs="${RUNS:-10000000}"
mkdir -p "corpus/$target"
cargo +nightly fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
  -runs="$runs" -max_len="${MAX_LEN:-16384}" -print_final_stats=1
