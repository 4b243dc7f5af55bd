#!/usr/bin/env bash
# The test command: set-up (ONNX Runtime library, ffmpeg, and what only the tests use), the runtime's layering
# (scripts/check-layers.sh), then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-tests.sh
bash scripts/check-layers.sh
# --no-fail-fast: every harness runs, and the command still exits non-zero on any failure.
cargo test --workspace --no-fail-fast "$@"
