#!/usr/bin/env bash
# The GPU check in one command, for the first user with an NVIDIA GPU (none has run it yet:
# this project's machines have no GPU). Needs the GPU build of ONNX Runtime: set ORT_DYLIB_PATH
# to onnxruntime-gpu's libonnxruntime.so (pip install onnxruntime-gpu), CUDA 12 and, for the
# TensorRT cases, TensorRT's libraries on the loader path.
#
#   bash scripts/gpu-check.sh --dry-run   # the plan; runs and writes nothing, exit 0
#   bash scripts/gpu-check.sh             # compile the fixture and demo engines for cuda and
#                                         # tensorrt at fp32/fp16/bf16, parity against the CPU
#                                         # engine, step, LoRA switch and batched-LoRA timings
#   bash scripts/gpu-check.sh --json      # the same as one JSON document
#
# Without a GPU it says so and exits 1, having written nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --quiet -p v2l-cli -p v2l-bench
exec target/release/v2l-bench gpu "$@"
