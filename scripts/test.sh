#!/usr/bin/env bash
# The test command: set-up (ONNX Runtime library, ffmpeg) then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace "$@"
