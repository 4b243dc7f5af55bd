#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU (first run on an H100 on
# 2026-11-26; docs/status.md). It sets up what the GPU needs from PyPI (scripts/setup.sh --gpu:
# onnxruntime-gpu and the CUDA 13 libraries its CUDA provider loads, into .v2l/; nothing to put
# on LD_LIBRARY_PATH; the driver is the machine's), builds the binaries and runs `v2l-bench gpu`.
#
#   bash scripts/gpu-check.sh --dry-run   # the plan; runs and writes nothing, exit 0
#   bash scripts/gpu-check.sh             # compile the fixtures and the demo engine for cuda (and
#                                         # tensorrt where libnvinfer.so.10 loads) at fp32/fp16/bf16:
#                                         # parity against the CPU engine, step, LoRA switch and
#                                         # batched-LoRA timings, a row as each case ends
#   bash scripts/gpu-check.sh --scale     # also the 5B-width DiT and the real VAE decode beside
#                                         # PyTorch on the same GPU (--torch-python PY)
#   bash scripts/gpu-check.sh --scale --sweep
#                                         # and v2l's side of each real-size case again under other
#                                         # kernel choices, a row each (attention kernels for the DiT;
#                                         # cuDNN conv search, workspace, NHWC and tiling for the VAE)
#   bash scripts/gpu-check.sh --json      # one JSON line per row
#   bash scripts/gpu-check.sh --only effects --scale --scale-only "vae-decode bf16" --budget-min 8
#                                         # start nothing after 8 minutes (a GPU lent for a fixed
#                                         # time): the rest get a "not started" row, exit 1
#   CUDA_LAUNCH_BLOCKING=1 bash scripts/gpu-check.sh --profile --only effects
#                                         # where each graph's time goes, by operator and provider
#                                         # (ONNX Runtime's traces; blocking launches so a node's
#                                         # time is its kernels': its timings are not the fast path's)
#   V2L_CUDA_OPTIONS=cudnn_conv_algo_search=HEURISTIC,prefer_nhwc=1 bash scripts/gpu-check.sh ...
#                                         # the CUDA provider's kernel choices for this run, over
#                                         # each engine's (v2l-compile --cuda-option records them)
#   ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1 bash scripts/gpu-check.sh --scale --only none
#                                         # ONNX Runtime prints which attention kernel each
#                                         # MultiHeadAttention runs (flash, memory-efficient, cuDNN)
#
# Without a GPU it says so and exits 1, having written nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --gpu >/dev/null
cargo build --release --quiet -p v2l-cli -p v2l-bench
exec "$(bash scripts/target-dir.sh)/release/v2l-bench" gpu "$@"
